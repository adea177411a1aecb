"""Cross-check our GPTQ/AWQ against llm-compressor's GPTQModifier/AWQModifier: `python -m harness.bench.ptq`.

Every run quantizes the same model with the same calibration token ids in its own subprocess (so
wall time and peak memory are its own), with the same thread count, and hands back the quantized
dense weights; this process then measures all of them with the same code on held-out toy text:

- per-layer output MSE: hidden states after each decoder layer vs the full-precision model's, on
  held-out toy text (test-split problems with their reasoning, packed into rows);
- perplexity of the responses (reasoning + answer) of held-out problems — the tokens the toy is trained
  to predict; greedy accuracy on held-out toy problems (the trained toy only);
- wall time of the quantization call and the process's peak RSS.

llm-compressor (the `bench` extra, llmcompressor==0.14.0.1) pins compressed-tensors 0.19.0, so it lives in
its own environment: pass its interpreter with --their-python (e.g. a venv made with
`python -m venv /tmp/benchvenv && /tmp/benchvenv/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1 &&
/tmp/benchvenv/bin/pip install --no-deps -e .`). Our side runs in this interpreter.

Their AWQ is AWQModifier (duo scaling, no clip search) followed by QuantizationModifier (min-max RTN
on the smoothed weights); their GPTQ is GPTQModifier with actorder=static and dampening 0.01 — the
same settings as our defaults. Both sides quantize every Linear of the decoder layers, asymmetric.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SPECS = {"w4g128": (4, 128), "w3g128": (3, 128)}
WIDE = dict(hidden_size=1024, intermediate_size=3072, num_attention_heads=8, num_key_value_heads=4, head_dim=128)


# ------------------------------------------------------------------ child processes

def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _child(args: dict) -> None:
    torch.set_num_threads(args["threads"])
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(args["model_dir"], dtype=torch.float32).eval()
    ids = torch.load(args["calib"])
    bits, group = args["bits"], args["group_size"]
    before = _rss_mb()
    if args["impl"] == "ours":
        from harness import registry
        from harness.quant.context import QuantContext
        from harness.quant.quantizer import QuantSpec
        cls = registry.get("method", args["method"])
        cfg = cls.Config(name=args["method"])
        ctx = QuantContext(spec=QuantSpec(bits=bits, group_size=group, sym=False), method_cfg=cfg,
                           calib=lambda: ids, device=torch.device("cpu"), progress=False)
        t0 = time.perf_counter()
        cls(cfg).quantize(model, ctx)
        wall = time.perf_counter() - t0
        state = model.state_dict()
    else:
        wall, state = _theirs(model, ids, args["method"], bits, group)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    torch.save({"state_dict": state, "wall_s": wall, "peak_rss_mb": peak, "rss_before_mb": before}, args["out"])


def _theirs(model, ids, method: str, bits: int, group: int):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme, fake_quantize
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    if not torch.cuda.is_available():
        # llm-compressor 0.14's AWQ pins its activation cache unconditionally, which raises on a host with no
        # accelerator; pinning only speeds up host-to-device copies, so on CPU it is safely skipped.
        from llmcompressor.pipelines.cache import IntermediatesCache
        IntermediatesCache.pin_memory = lambda self, *a, **k: None
    n, t = ids.shape
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=bits, type="int", symmetric=False, strategy="group", group_size=group))
    if method == "gptq":
        recipe = [GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"], block_size=128,
                               dampening_frac=0.01, actorder="static")]
    else:
        recipe = [AWQModifier(n_grid=20), QuantizationModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])]
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * t for _ in range(n)]})
    t0 = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=n, max_seq_length=t,
            pipeline="sequential")
    wall = time.perf_counter() - t0
    # Dense weights as their checkpoint would decode: fake-quantize with the stored grid.
    state = {}
    extra = ("weight_scale", "weight_zero_point", "weight_g_idx", "weight_global_scale", "weight_shape")
    quantized = {}
    for name, mod in model.named_modules():
        sch = getattr(mod, "quantization_scheme", None)
        if sch is not None and sch.weights is not None and hasattr(mod, "weight_scale"):
            with torch.no_grad():
                quantized[f"{name}.weight"] = fake_quantize(mod.weight, mod.weight_scale,
                                                            getattr(mod, "weight_zero_point", None), sch.weights)
    for k, v in model.state_dict().items():
        if k.rsplit(".", 1)[-1] in extra:
            continue
        state[k] = quantized.get(k, v).detach().clone()
    return wall, state


# ------------------------------------------------------------------ measurements

def _layer_outputs(model, ids: torch.Tensor, batch: int = 8) -> list[torch.Tensor]:
    outs: list[list[torch.Tensor]] = [[] for _ in model.model.layers]
    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: outs[i].append(o[0] if isinstance(o, tuple) else o))
             for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        for s in range(0, ids.shape[0], batch):
            model(input_ids=ids[s:s + batch], use_cache=False)
    for h in hooks:
        h.remove()
    return [torch.cat(o) for o in outs]


def _perplexity(model, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], rows: int = 16) -> float:
    """exp(mean token NLL) over the response tokens (reasoning + answer) of held-out toy examples."""
    ids, attn, labels = batch
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, ids.shape[0], rows):
            logits = model(input_ids=ids[s:s + rows], attention_mask=attn[s:s + rows], use_cache=False).logits
            logits, target = logits[:, :-1].float(), labels[s:s + rows, 1:]
            total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                             ignore_index=-100, reduction="sum"))
            count += int((target != -100).sum())
    return float(torch.exp(torch.tensor(total / count)))


def _ppl_batch(tok, n: int):
    from harness.toy import arith
    from harness.toy.train import _batch
    return _batch(tok, arith.problems("test", n, 2), True)


def _toy_accuracy(model, tok, n: int) -> float:
    from harness.backends.hf import HFBackend, HFBackendConfig
    from harness.scoring import last_boxed, split_reasoning
    from harness.toy import arith
    from harness.types import Sampling
    problems = arith.problems("test", n, 0)
    prompts = [tok.apply_chat_template([{"role": "user", "content": p.question()}], tokenize=False,
                                       add_generation_prompt=True) for p in problems]
    backend = HFBackend(HFBackendConfig(batch_size=64), model, tok, torch.device("cpu"), progress=False)
    outs = backend.generate(prompts, Sampling(n=1, temperature=0.0, max_new_tokens=128))
    correct = 0
    for p, o in zip(problems, outs):
        text, truncated = split_reasoning(o[0].text, o[0].finish_reason)
        correct += (not truncated) and last_boxed(text) == str(p.answer)
    return correct / n


def _eval_ids(tok, n: int, seq_len: int) -> torch.Tensor:
    """Held-out toy text (test-split problems with their reasoning), packed into rows."""
    from harness.toy import arith
    from harness.toy.train import encode_example
    buf = []
    for p in arith.problems("test", n * seq_len // 20 + 16, 1):
        buf.extend(encode_example(tok, p, with_reasoning=True)[0])
        if len(buf) >= n * seq_len:
            break
    return torch.tensor(buf[:n * seq_len]).view(n, seq_len)


# ------------------------------------------------------------------ orchestration

def _prepare_models(work: Path, names: list[str], wide_layers: int) -> dict[str, Path]:
    from transformers import Qwen3Config, Qwen3ForCausalLM
    from harness.toy.build import ensure_toy
    from harness.toy.tokenizer import build_tokenizer
    out = {}
    for name in names:
        if name == "toy":
            d = work / "toy"       # a snapshot: a rebuild of the shipped toy mid-run must not change the model
            if not (d / "config.json").exists():
                shutil.copytree(ensure_toy("toy"), d)
            out[name] = d
        elif name == "wide":
            d = work / "wide"
            if not (d / "config.json").exists():
                tok = build_tokenizer()
                cfg = Qwen3Config(vocab_size=len(tok), num_hidden_layers=wide_layers, max_position_embeddings=1024,
                                  tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
                                  eos_token_id=tok.eos_token_id, **WIDE)
                torch.manual_seed(0)
                model = Qwen3ForCausalLM(cfg).float()
                model.save_pretrained(d)
                tok.save_pretrained(d)
            out[name] = d
        else:
            raise SystemExit(f"unknown model {name!r}; allowed: toy, wide")
    return out


def _spawn(python: str, args: dict, threads: int, cwd: Path, log: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    repo = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = f"{repo}{os.pathsep}{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(repo)
    with log.open("w") as f:
        proc = subprocess.run([python, "-m", "harness.bench.ptq", "--child", json.dumps(args)], cwd=cwd, env=env,
                              stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"{args['impl']} {args['method']} failed ({proc.returncode}); log: {log}\n"
                         + log.read_text()[-3000:])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m harness.bench.ptq", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="toy,wide")
    ap.add_argument("--specs", default="w4g128,w3g128", help=f"comma list of {', '.join(SPECS)}")
    ap.add_argument("--methods", default="gptq,awq")
    ap.add_argument("--their-python", default=os.environ.get("RQBENCH_BENCH_PYTHON"),
                    help="interpreter with llmcompressor installed (default: $RQBENCH_BENCH_PYTHON); omit to run ours only")
    ap.add_argument("--n-samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--eval-samples", type=int, default=32)
    ap.add_argument("--accuracy", type=int, default=200, help="held-out toy problems for greedy accuracy (0: skip)")
    ap.add_argument("--wide-layers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1, help="runs per side, alternating; the fastest counts")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default="results/bench/ptq.json")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        _child(json.loads(a.child))
        return 0

    from transformers import AutoModelForCausalLM
    from harness.calib import calibration_ids
    from harness.toy.tokenizer import build_tokenizer
    torch.set_num_threads(a.threads)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="rqbench-ptq-"))
    work.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    models = _prepare_models(work, a.models.split(","), a.wide_layers)
    calib = calibration_ids({"name": "toy", "n_samples": a.n_samples, "seq_len": a.seq_len, "seed": 0}, tok)
    torch.save(calib, work / "calib.pt")
    eval_ids = _eval_ids(tok, a.eval_samples, a.seq_len)       # layer MSE: held-out text, packed
    ppl_batch = _ppl_batch(tok, 4 * a.eval_samples)             # perplexity: held-out responses
    impls = ["ours"] + (["theirs"] if a.their_python else [])
    rows = []
    for mname, mdir in models.items():
        base = AutoModelForCausalLM.from_pretrained(mdir, dtype=torch.float32).eval()
        ref_layers = _layer_outputs(base, eval_ids)
        fp = {"ppl": _perplexity(base, ppl_batch)}
        if mname == "toy" and a.accuracy:
            fp["acc"] = _toy_accuracy(base, tok, a.accuracy)
        print(f"[bench] {mname}: fp ppl {fp['ppl']:.4f}" + (f" acc {fp['acc']:.3f}" if "acc" in fp else ""),
              file=sys.stderr, flush=True)
        for sname in a.specs.split(","):
            bits, group = SPECS[sname]
            for method in a.methods.split(","):
                row = {"model": mname, "spec": sname, "method": method, "fp": fp}
                results = {}
                for rep in range(a.repeats):        # alternate ours/theirs; keep each one's fastest run
                    for impl in impls:
                        out = work / f"{mname}-{sname}-{method}-{impl}-{rep}.pt"
                        args = {"impl": impl, "method": method, "model_dir": str(mdir),
                                "calib": str(work / "calib.pt"), "bits": bits, "group_size": group,
                                "threads": a.threads, "out": str(out)}
                        print(f"[bench] {mname} {sname} {method} {impl} (run {rep + 1}/{a.repeats}) ...",
                              file=sys.stderr, flush=True)
                        _spawn(sys.executable if impl == "ours" else a.their_python, args, a.threads, work,
                               work / f"{out.stem}.log")
                        res = torch.load(out)
                        out.unlink()
                        if impl in results:
                            walls = results[impl]["walls"] + [res["wall_s"]]
                            same = all(torch.equal(res["state_dict"][k], results[impl]["state_dict"][k])
                                       for k in res["state_dict"])
                            results[impl]["deterministic"] &= same
                            if res["wall_s"] < results[impl]["wall_s"]:
                                res.update(deterministic=results[impl]["deterministic"],
                                           state_dict=results[impl]["state_dict"])
                                results[impl] = res
                            results[impl]["walls"] = walls
                        else:
                            results[impl] = {**res, "walls": [res["wall_s"]], "deterministic": True}
                for impl in impls:
                    res = results[impl]
                    model = AutoModelForCausalLM.from_pretrained(mdir, dtype=torch.float32).eval()
                    missing, unexpected = model.load_state_dict(res["state_dict"], strict=False)
                    if unexpected or [k for k in missing if k != "lm_head.weight"]:
                        raise SystemExit(f"{impl}: state dict mismatch: {missing[:3]} {unexpected[:3]}")
                    model.tie_weights()
                    layers = _layer_outputs(model, eval_ids)
                    r = {"layer_mse": [float(((x - y) ** 2).mean()) for x, y in zip(layers, ref_layers)],
                         "ppl": _perplexity(model, ppl_batch), "wall_s": res["wall_s"], "walls": res["walls"],
                         "deterministic": res["deterministic"],
                         "peak_rss_mb": res["peak_rss_mb"], "rss_before_mb": res["rss_before_mb"]}
                    if mname == "toy" and a.accuracy:
                        r["acc"] = _toy_accuracy(model, tok, a.accuracy)
                    row[impl] = r
                rows.append(row)
                print(_format_row(row), flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    setup = {k: getattr(a, k) for k in ("n_samples", "seq_len", "eval_samples", "accuracy", "wide_layers", "threads",
                                        "repeats")}
    Path(a.out).write_text(json.dumps({"setup": setup, "rows": rows}, indent=1) + "\n")
    print("\n" + format_table(rows))
    print(f"\n[bench] wrote {a.out}", file=sys.stderr)
    return 0


def _format_row(row) -> str:
    o = row["ours"]
    s = f"{row['model']:5s} {row['spec']} {row['method']:4s} ours: mse {['%.3g' % v for v in o['layer_mse']]} " \
        f"ppl {o['ppl']:.4f} wall {o['wall_s']:.1f}s"
    if "theirs" in row:
        t = row["theirs"]
        s += f" | theirs: mse {['%.3g' % v for v in t['layer_mse']]} ppl {t['ppl']:.4f} wall {t['wall_s']:.1f}s"
    return s


def format_table(rows) -> str:
    """Markdown: per-layer MSE ratio (ours/theirs), ppl, accuracy, wall time and peak RSS for both."""
    head = ("| model | spec | method | layer MSE ours | layer MSE theirs | MSE ratio (max) | ppl fp / ours / theirs "
            "| acc fp / ours / theirs | wall ours / theirs (ratio) | peak RSS MB ours / theirs |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        o, t = r["ours"], r.get("theirs")
        mse_o = " ".join(f"{v:.3g}" for v in o["layer_mse"])
        if t:
            mse_t = " ".join(f"{v:.3g}" for v in t["layer_mse"])
            ratios = [a / b if b > 0 else float("inf") for a, b in zip(o["layer_mse"], t["layer_mse"])]
            ratio = f"{max(ratios):.3f}"
            ppl = f"{r['fp']['ppl']:.4f} / {o['ppl']:.4f} / {t['ppl']:.4f}"
            wall = f"{o['wall_s']:.1f} / {t['wall_s']:.1f} ({o['wall_s'] / t['wall_s']:.2f})"
            mem = f"{o['peak_rss_mb']:.0f} / {t['peak_rss_mb']:.0f}"
        else:
            mse_t, ratio = "-", "-"
            ppl = f"{r['fp']['ppl']:.4f} / {o['ppl']:.4f} / -"
            wall, mem = f"{o['wall_s']:.1f} / -", f"{o['peak_rss_mb']:.0f} / -"
        if "acc" in o:
            acc = f"{r['fp']['acc']:.3f} / {o['acc']:.3f} / " + (f"{t['acc']:.3f}" if t else "-")
        else:
            acc = "-"
        lines.append(f"| {r['model']} | {r['spec']} | {r['method']} | {mse_o} | {mse_t} | {ratio} | {ppl} | {acc} "
                     f"| {wall} | {mem} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
