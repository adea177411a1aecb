"""SliderQuant benchmark: `python -m harness.bench.sliderquant {accuracy,memory} ...`.

accuracy: the toy model at W2 g128 (default; `--act-bits 4 --bits 4` for W4A4), SliderQuant vs GPTQ vs RTN
    and SliderQuant's ablations (`--variants`), each a full rqbench run (quantize -> generate -> score on
    the toy arithmetic task) over several calibration seeds (`calib.seed`); reports accuracy (mean ± std
    over seeds), its retention vs fp and the quantize wall time vs GPTQ's. fp and RTN use no calibration:
    one run each. Every run gets its own results/cache directory, so nothing is reused. `--jobs` runs
    that many in parallel (one thread each); wall times are then those of a shared machine.
memory: a randomly initialised Qwen3-0.6B-shaped model (hidden 1024, intermediate 3072), quantized by SliderQuant in
    a child process per (depth, window size); the child samples its RSS every 5 ms during `quantize`
    and reports the peak above the RSS just before (the model itself is already resident then, so
    what is left is activations, targets, the window's fake-quant weights and optimizer state). The child
    runs with MALLOC_MMAP_THRESHOLD_=131072 (--mmap-threshold) so that RSS follows live memory; with glibc's
    dynamic threshold, heap fragmentation adds a few hundred MB that grow with the number of windows.

On these 2-core machines the paper's recipe (128 x 2048 calibration, 60 epochs at W2) is far out of
reach; `--epochs`, `--n-samples`, `--batch-size` shrink it, and the output records what was used.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from harness.bench import PeakRSS

ABLATIONS = {
    "sliderquant": [],
    "fixed-windows (CBQ-like)": ["method.shallow=0", "method.deep=0"],
    "window-1 (OmniQuant-like)": ["method.shallow=0", "method.deep=0", "method.window_size=1"],
    "gamma=1": ["method.gamma=1.0"],
    "no-lowrank": ["method.rank=0"],
    "with-scales": ["method.scales=true"],          # weight-only defaults (lora_only) train no scales
    "unscaled-lowrank": ["method.lora_alpha=4"],    # B A without the authors' lora_alpha / r = 1/4 (rqbench before)
    "previous-w4a16": ["method.mode=slider", "method.lr_lowrank=1e-4", "method.lora_alpha=4"],   # rqbench's earlier W3/W4A16 default
    "no-scales": ["method.scales=false"],
    "no-rotation": ["method.rotate=false"],         # W4A4's default rotates
    "linear-acts-only": ["method.qkv_quant=false"],     # W4A4 without the attention's q/k/v quantization (rqbench before)
    "untrained (epochs=0)": ["method.epochs=0"],    # the starting point: (rotation +) RTN on the clip-init grid
}


# ------------------------------------------------------------------ accuracy on the toy

def _one(job: tuple[list[str], str]) -> dict:
    overrides, work = job
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    from hydra import compose, initialize_config_dir

    from harness.cli import CONF_DIR, execute
    with tempfile.TemporaryDirectory(prefix="sqbench-", dir=work) as d:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name="config", overrides=["progress=false", f"results_dir={d}/r",
                                                           f"cache_dir={d}/c", *overrides])
        out = execute(cfg)
    return {"acc": out["metrics"]["acc"], "quantize_s": out["seconds"].get("quantize", 0.0)}


def accuracy(args) -> dict:
    common = [f"quant.bits={args.bits}", f"quant.group_size={args.group_size}", f"task.limit={args.limit}",
              f"calib.n_samples={args.n_samples}"]
    sq = [f"method.batch_size={args.batch_size}"] + ([f"method.epochs={args.epochs}"] if args.epochs is not None else [])
    sq += [f"method.act_bits={args.act_bits}"] if args.act_bits else []
    plan = [("fp", ["method=fp"], [0]), ("rtn (weight-only)", ["method=rtn"], [0]),
            ("gptq (weight-only)", ["method=gptq"], args.seeds)] if args.baselines else []
    for name in args.variants:
        seeds = args.seeds if name == "sliderquant" or args.ablation_seeds == "all" else args.seeds[:1]
        plan.append((name, ["method=sliderquant", *sq, *ABLATIONS[name]], seeds))
    jobs = [(name, seed, ([*common, *over, f"calib.seed={seed}"], tempfile.gettempdir()))
            for name, over, seeds in plan for seed in seeds]
    rows: dict[str, list[dict]] = {name: [] for name, _, _ in plan}
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_one, job): (name, seed) for name, seed, job in jobs}
        for fut in as_completed(futures):
            name, seed = futures[fut]
            r = {**fut.result(), "seed": seed}
            rows[name].append(r)
            print(f"{name:28s} seed {seed}: acc {r['acc']:.4f}  quantize {r['quantize_s']:.1f}s", flush=True)
    summary = {}
    for name, rs in rows.items():
        rs.sort(key=lambda r: r["seed"])
        accs = [r["acc"] for r in rs]
        summary[name] = {"acc_mean": statistics.mean(accs), "acc_std": statistics.pstdev(accs) if len(accs) > 1 else 0.0,
                         "quantize_s_mean": statistics.mean(r["quantize_s"] for r in rs), "runs": rs}
    return {"setting": {"bits": args.bits, "act_bits": args.act_bits, "group_size": args.group_size,
                        "limit": args.limit, "n_samples": args.n_samples, "epochs": args.epochs,
                        "batch_size": args.batch_size, "seeds": args.seeds, "jobs": args.jobs,
                        "threads": os.environ.get("OMP_NUM_THREADS", "1")},
            "results": summary}


def print_accuracy(res: dict) -> None:
    """acc mean ± std over seeds, retention vs fp and quantize time vs GPTQ, both measured in the same run."""
    r = res["results"]
    fp = r.get("fp", {}).get("acc_mean")
    gptq_s = r.get("gptq (weight-only)", {}).get("quantize_s_mean")
    print(f"\n{'method':28s} {'acc':>7s} {'± std':>7s} {'n':>3s} {'vs fp':>7s} {'quantize s':>11s} {'vs gptq':>8s}")
    for name, x in r.items():
        keep = f"{x['acc_mean'] / fp:7.1%}" if fp else f"{'-':>7s}"
        ratio = f"{x['quantize_s_mean'] / gptq_s:7.1f}x" if gptq_s and name != "fp" else f"{'-':>8s}"
        print(f"{name:28s} {x['acc_mean']:7.4f} {x['acc_std']:7.4f} {len(x['runs']):3d} {keep} "
              f"{x['quantize_s_mean']:11.1f} {ratio}")


# ------------------------------------------------------------------ peak memory vs depth and window size

def _child(spec: dict) -> None:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from harness.quant.context import QuantContext
    from harness.quant.quantizer import QuantSpec
    from methods.sliderquant import SliderQuant, SliderQuantConfig
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=512, hidden_size=1024, intermediate_size=3072, num_attention_heads=8,
                      num_key_value_heads=4, head_dim=128, num_hidden_layers=spec["layers"],
                      max_position_embeddings=1024, tie_word_embeddings=False)
    model = Qwen3ForCausalLM(cfg).eval()
    ids = torch.randint(0, 512, (spec["n"], spec["seq"]), generator=torch.Generator().manual_seed(0))
    mcfg = SliderQuantConfig(name="sliderquant", shallow=0, deep=0, window_size=spec["window"], stride=1,
                             gamma=1.0, epochs=1, batch_size=1)
    ctx = QuantContext(spec=QuantSpec(bits=2, group_size=128), method_cfg=mcfg, calib=lambda: ids, progress=False)

    with PeakRSS() as mem:
        t0 = time.time()
        SliderQuant(mcfg).quantize(model, ctx)
        wall = time.time() - t0
    print(json.dumps({"model_mb": mem.base / 2 ** 20, "peak_above_mb": mem.above_mb, "seconds": wall}))


def memory(args) -> dict:
    out = []
    for layers in args.layers:
        for window in args.windows:
            if window > layers:
                continue
            spec = {"layers": layers, "window": window, "n": args.n_samples, "seq": args.seq_len}
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            if args.mmap_threshold:         # big blocks straight from mmap: freed memory leaves RSS at once
                env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
            proc = subprocess.run([sys.executable, "-m", "harness.bench.sliderquant", "_child", json.dumps(spec)],
                                  capture_output=True, text=True, env=env)
            if proc.returncode:
                raise RuntimeError(proc.stderr[-2000:])
            r = {**spec, **json.loads(proc.stdout.strip().splitlines()[-1])}
            out.append(r)
            print(f"layers {layers} window {window}: model {r['model_mb']:.0f} MB, peak above model "
                  f"{r['peak_above_mb']:.0f} MB, {r['seconds']:.1f}s", flush=True)
    return {"setting": {"hidden": 1024, "intermediate": 3072, "n_samples": args.n_samples, "seq_len": args.seq_len,
                        "mmap_threshold": args.mmap_threshold, "epochs": 1, "gamma": 1.0, "bits": 2, "group_size": 128}, "results": out}


def main(argv=None) -> None:
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "_child":
        _child(json.loads(sys.argv[2]))
        return
    p = argparse.ArgumentParser(prog="python -m harness.bench.sliderquant", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("accuracy")
    a.add_argument("--bits", type=int, default=2)
    a.add_argument("--group-size", type=int, default=128)
    a.add_argument("--limit", type=int, default=200)
    a.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    a.add_argument("--act-bits", type=int, default=None, help="4: W4A4 (SliderQuant variants only)")
    a.add_argument("--n-samples", type=int, default=128)
    a.add_argument("--epochs", type=int, default=None, help="default: the method's own (60 at W2, else 20)")
    a.add_argument("--batch-size", type=int, default=3)
    a.add_argument("--jobs", type=int, default=1, help="runs in parallel, one thread each")
    a.add_argument("--variants", nargs="+", default=["sliderquant"], choices=list(ABLATIONS))
    a.add_argument("--ablation-seeds", choices=["first", "all"], default="first")
    a.add_argument("--no-baselines", dest="baselines", action="store_false", help="skip fp, RTN and GPTQ")
    m = sub.add_parser("memory")
    m.add_argument("--layers", type=int, nargs="+", default=[4, 12, 28], help="28: Qwen3-0.6B's full depth")
    m.add_argument("--windows", type=int, nargs="+", default=[1, 2, 4])
    m.add_argument("--n-samples", type=int, default=2)
    m.add_argument("--seq-len", type=int, default=256)
    m.add_argument("--mmap-threshold", type=int, default=131072,
                   help="glibc MALLOC_MMAP_THRESHOLD_ for the child (0: glibc's dynamic default, whose heap "
                        "fragmentation makes RSS grow with the number of windows visited, not with live memory)")
    for sp in (a, m):
        sp.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    res = accuracy(args) if args.cmd == "accuracy" else memory(args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1))
    if args.cmd == "accuracy":
        print_accuracy(res)


if __name__ == "__main__":
    main()
