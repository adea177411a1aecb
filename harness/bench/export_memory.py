"""Peak host RSS of GPTQ + fake export vs model depth: `python -m harness.bench.export_memory [--layers 4 12 28]`.

A randomly initialised Qwen3-0.6B-shaped model (hidden 1024, intermediate 3072, 16/8 heads of 128; a 512-token
vocabulary so that the embeddings do not hide the per-layer growth) is quantized by GPTQ (W4 g128, 2 x 64
calibration tokens) and exported (`export=fake`) in a child process per depth. The child samples its RSS every
5 ms from just before `quantize` to the end of `save_checkpoint` and reports the peak above the RSS just before
(the fp32 model is resident then), with MALLOC_MMAP_THRESHOLD_=131072 so RSS follows live memory (the pattern of
harness/bench/sliderquant.py). `--keep-codes` keeps every layer's integer codes in host RAM until the export
(rqbench before codes were spilled to disk per layer), so one run measures both.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from harness.bench import PeakRSS


def _child(spec: dict) -> None:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from harness.quant.context import QuantContext
    from harness.quant.export import save_checkpoint
    from harness.quant.quantizer import QuantSpec
    from harness.types import spill_layers
    from methods.gptq import GPTQ, GPTQConfig
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=512, hidden_size=1024, intermediate_size=3072, num_attention_heads=16,
                      num_key_value_heads=8, head_dim=128, num_hidden_layers=spec["layers"],
                      max_position_embeddings=1024, tie_word_embeddings=False)
    model = Qwen3ForCausalLM(cfg).eval()
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    ctx = QuantContext(spec=QuantSpec(bits=4, group_size=128), method_cfg=GPTQConfig(name="gptq"),
                       calib=lambda: ids, progress=False)

    t0 = time.perf_counter()
    with PeakRSS() as mem, tempfile.TemporaryDirectory() as d:
        with spill_layers(None if spec["keep_codes"] else os.path.join(d, "spill")):
            result = GPTQ(GPTQConfig(name="gptq")).quantize(model, ctx)
        quantized = sum(q.codes.numel() for q in result.layers.values()) if spec["keep_codes"] else \
            sum(result.layers.numel(n) for n in result.layers)
        save_checkpoint(model, None, result, os.path.join(d, "out"), "fake")
    print(json.dumps({"layers": spec["layers"], "keep_codes": spec["keep_codes"], "model_mb": mem.base / 2**20,
                      "peak_above_model_mb": mem.above_mb, "codes_mb": quantized / 2**20,
                      "seconds": time.perf_counter() - t0}))


def main(argv=None) -> None:
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "_child":
        _child(json.loads(sys.argv[2]))
        return
    ap = argparse.ArgumentParser(prog="python -m harness.bench.export_memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 12, 28])
    ap.add_argument("--modes", nargs="+", default=["keep-codes", "spill"], choices=["keep-codes", "spill"])
    args = ap.parse_args(argv)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
    rows = []
    for layers in args.layers:
        for mode in args.modes:
            spec = {"layers": layers, "keep_codes": mode == "keep-codes"}
            proc = subprocess.run([sys.executable, "-m", "harness.bench.export_memory", "_child", json.dumps(spec)],
                                  capture_output=True, text=True, env=env)
            if proc.returncode:
                raise SystemExit(proc.stderr[-3000:])
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(r)
            print(f"{layers:3d} layers  {mode:10s}  model {r['model_mb']:7.0f} MB  codes {r['codes_mb']:6.0f} MB  "
                  f"peak above model {r['peak_above_model_mb']:7.0f} MB  ({r['seconds']:.0f} s)", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
