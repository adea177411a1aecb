"""Reasoning-QAT on the toy with the defaults a user gets: `python -m harness.bench.reasoning_qat [--bits 2 3] [--seeds 0 1 2]`

For each (bit width, seed) one PTQ initialisation (GPTQ g128, asymmetric, calib=toy with calib.seed =
seed, i.e. `rqbench method=reasoning_qat calib.seed=S method.seed=S method.rl.seed=S`) is followed by
three trainings from that same start, each with the method's default config (conf/method/reasoning_qat.yaml,
mirrored by ReasoningQATConfig) and measured on held-out toy problems (greedy accuracy of the boxed
answer, the arith task's scorer) with its wall time:

  ptq        the GPTQ model (= step 0 of QAT, bit for bit)
  qat-sft    QAT with cross-entropy on the fp model's traces of arith training problems (data=task)
  qat-kd     QAT with forward KL to the full-precision model (the default objective)
  qat-kd+rl  qat-kd followed by GRPO with the default RL settings (reward: the arith scorer, training prompts)

The training data (fp traces, cached under --cache-dir) are built once per seed and shared. Results go to
a JSON file, a table on stdout and a PNG of the training / validation loss curves (and GRPO rewards).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch


VARIANTS = ("ptq", "qat-sft", "qat-kd", "qat-kd+rl")


def accuracy(model, tok, n: int, batch_size: int = 100) -> float:
    from harness.backends.hf import HFBackend, HFBackendConfig
    from harness.pipeline import render_prompt
    from harness.types import Sampling
    from tasks.arith import ArithConfig, ArithTask
    task = ArithTask(ArithConfig(name="arith", limit=n))
    exs = task.examples()
    backend = HFBackend(HFBackendConfig(batch_size=batch_size), model, tok, torch.device("cpu"), progress=False)
    outs = backend.generate([render_prompt(tok, task.prompt(e), None) for e in exs],
                            Sampling(n=1, temperature=0.0, max_new_tokens=128))
    return sum(task.score(e, o[0].text, o[0].finish_reason).correct for e, o in zip(exs, outs)) / len(exs)


def run_one(base, tok, bits: int, seed: int, args) -> dict:
    from harness.calib import calibration_ids
    from harness.quant.context import QuantContext
    from harness.quant.quantizer import QuantSpec
    from methods.reasoning_qat import (ReasoningQAT, ReasoningQATConfig, RLConfig, StateFile, make_task, train_grpo,
                                       train_qat)
    spec = QuantSpec(bits=bits, group_size=128)
    ids = calibration_ids({"name": "toy", "n_samples": 128, "seq_len": 128, "seed": seed}, tok)    # calib=toy
    cfg = ReasoningQATConfig(name="reasoning_qat", task="arith", seed=seed,
                             rl=RLConfig(enabled=True, seed=seed, **(args.rl or {})), **(args.override or {}))
    ctx = QuantContext(spec=spec, method_cfg=cfg, tokenizer=tok, calib=lambda: ids, progress=False,
                       cache_dir=Path(args.cache_dir))
    t0 = time.perf_counter()
    examples, val, report = ReasoningQAT(cfg).training_data(base, ctx, ids)
    out: dict = {"bits": bits, "seed": seed, "data": report.as_dict(), "data_seconds": round(time.perf_counter() - t0, 2)}

    def start():
        m = copy.deepcopy(base)
        for p in m.parameters():
            p.requires_grad_(False)
        t = time.perf_counter()
        ReasoningQAT(cfg).ptq_init(m, ctx, ids)
        return m, time.perf_counter() - t

    model, ptq_s = start()
    out["ptq"] = {"acc": accuracy(model, tok, args.limit), "seconds": round(ptq_s, 2)}
    none = StateFile(None, {})
    for objective in [o for o in ("sft", "kd") if f"qat-{o}" in args.variants or (o == "kd" and "qat-kd+rl" in args.variants)]:
        c = replace(cfg, objective=objective)
        model, ptq_s = start()
        t = time.perf_counter()
        tr = train_qat(model, base if objective == "kd" else None, examples, c, pad_id=tok.pad_token_id,
                       state_file=none, val_examples=val, progress=args.progress)
        out[f"qat-{objective}"] = {"acc": accuracy(model, tok, args.limit),
                                   "seconds": round(ptq_s + time.perf_counter() - t, 2), **tr}
    if "qat-kd+rl" in args.variants:
        t = time.perf_counter()          # +rl continues from the qat-kd model just measured
        g = train_grpo(model, tok, make_task("arith"), cfg, device=torch.device("cpu"), state_file=none,
                       progress=args.progress)
        out["qat-kd+rl"] = {"acc": accuracy(model, tok, args.limit),
                            "seconds": round(out["qat-kd"]["seconds"] + time.perf_counter() - t, 2), **g}
    return out


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = report["runs"]
    fig, axes = plt.subplots(len(runs), 3, figsize=(13, 2.6 * len(runs)), squeeze=False)
    for ax, r in zip(axes, runs):
        for col, obj in ((0, "qat-sft"), (1, "qat-kd")):
            if obj not in r:
                continue
            d = r[obj]
            ax[col].plot(range(1, len(d["losses"]) + 1), d["losses"], lw=0.6, label="train")
            ax[col].plot([s for s, _ in d["val"]], [v for _, v in d["val"]], "o-", label="validation")
            if d.get("best_step") is not None:
                ax[col].axvline(d["best_step"], color="k", ls=":", lw=0.8)
            ax[col].set_yscale("log")
            ax[col].set_title(f"W{r['bits']} seed {r['seed']} {obj} (acc {d['acc']:.3f}, ptq {r['ptq']['acc']:.3f})",
                              fontsize=8)
            ax[col].legend(fontsize=6)
        if "qat-kd+rl" in r:
            g = r["qat-kd+rl"]
            ax[2].plot(range(1, len(g["rewards"]) + 1), g["rewards"], "o-", label="sampled reward")
            if g.get("val"):
                ax[2].plot([s for s, _ in g["val"]], [v for _, v in g["val"]], "s-", label="validation accuracy")
            ax[2].set_title(f"GRPO (acc {g['acc']:.3f}, kd {r['qat-kd']['acc']:.3f})", fontsize=8)
            ax[2].set_ylim(0, 1)
            ax[2].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--limit", type=int, default=500, help="held-out problems evaluated (the arith task's 500)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--override", type=json.loads, default=None, help="JSON of ReasoningQATConfig fields")
    ap.add_argument("--rl", type=json.loads, default=None, help="JSON of RLConfig fields")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "rqbench"))
    ap.add_argument("--out", default="results/bench/reasoning_qat.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from harness.toy.build import ensure_toy, weights_digest
    path = ensure_toy("toy")
    tok = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for p in base.parameters():
        p.requires_grad_(False)
    report = {"args": vars(args), "toy_weights": weights_digest(path), "fp_acc": accuracy(base, tok, args.limit),
              "runs": []}
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    variants = [v for v in VARIANTS if v == "ptq" or v in args.variants]
    for bits in args.bits:
        for seed in args.seeds:
            r = run_one(base, tok, bits, seed, args)
            report["runs"].append(r)
            out_path.write_text(json.dumps(report, indent=1) + "\n")
            print(json.dumps({"bits": bits, "seed": seed, **{v: [r[v]["acc"], r[v]["seconds"]] for v in variants if v in r}}),
                  flush=True)
    plot(report, out_path.with_suffix(".png"))
    print(f"\nfp accuracy {report['fp_acc']:.3f} on {args.limit} held-out toy problems; curves: {out_path.with_suffix('.png')}")
    print(f"{'variant':<12}" + "".join(f"{'W%d g128 acc (s)' % b:>28}" for b in args.bits))
    for v in variants:
        row = f"{v:<12}"
        for b in args.bits:
            runs = [r[v] for r in report["runs"] if r["bits"] == b and v in r]
            if not runs:
                row += f"{'-':>28}"
                continue
            accs = [x["acc"] for x in runs]
            sd = statistics.pstdev(accs) if len(accs) > 1 else 0.0
            row += f"{statistics.mean(accs):>12.3f} ± {sd:.3f} {statistics.mean(x['seconds'] for x in runs):>7.0f}s"
        print(row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
