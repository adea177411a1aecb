"""Reasoning-QAT on the toy: `python -m harness.bench.reasoning_qat [--bits 2 3] [--seeds 0 1 2] ...`

For each (bit width, seed) one PTQ initialisation (GPTQ, g128, asymmetric, calib=toy with calib.seed =
seed) is followed by three trainings from that same start, each measured on held-out toy problems
(greedy accuracy of the boxed answer, the arith task's scorer) with its wall time:

  ptq      the GPTQ model (= step 0 of QAT, bit for bit)
  qat-sft  QAT with cross-entropy on the training documents
  qat-kd   QAT with forward KL to the full-precision model
  +rl      qat-kd followed by GRPO (reward: the arith scorer on *training* problems)

The QAT models are evaluated as fake-quant models, whose forward is exactly the exported checkpoint's
(same codes, same decode). Training seeds (`method.seed`, `rl.seed`) follow the run seed. Results go to
a JSON file (default results/bench/reasoning_qat.json) and a table on stdout; the RL reward curves are
kept per run.
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
    from methods.reasoning_qat import ReasoningQAT, ReasoningQATConfig, RLConfig, StateFile, train_grpo, train_qat
    from tasks.arith import ArithConfig, ArithTask
    spec = QuantSpec(bits=bits, group_size=128)
    # Rows of 512 tokens hold ~7 toy documents, so they split back into whole documents (packing=false);
    # 128-token rows would be trained as packed rows with documents cut at the row edges.
    ids = calibration_ids({"name": "toy", "n_samples": args.n_samples, "seq_len": 512, "seed": seed}, tok)
    rl = RLConfig(enabled=True, steps=args.rl_steps, prompts_per_step=args.rl_prompts, group_size=args.rl_group,
                  max_new_tokens=96, lr=args.rl_lr, seed=seed)
    cfg = ReasoningQATConfig(name="reasoning_qat", steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                             warmup=args.steps // 20, seed=seed, rl=rl)
    out: dict = {"bits": bits, "seed": seed}

    def start():
        m = copy.deepcopy(base)
        for p in m.parameters():
            p.requires_grad_(False)
        t0 = time.perf_counter()
        ReasoningQAT(cfg).ptq_init(m, QuantContext(spec=spec, method_cfg=cfg, tokenizer=tok, calib=lambda: ids,
                                                   progress=False), ids)
        return m, time.perf_counter() - t0

    model, ptq_s = start()
    out["ptq"] = {"acc": accuracy(model, tok, args.limit), "seconds": round(ptq_s, 2)}
    examples, how = ReasoningQAT(cfg).examples(ids, tok)
    out["train_data"], out["train_examples"] = how, len(examples)
    none = StateFile(None, {})
    for objective in ("sft", "kd"):
        c = replace(cfg, objective=objective)
        model, ptq_s = start()
        t0 = time.perf_counter()
        tr = train_qat(model, base if objective == "kd" else None, examples, c, pad_id=tok.pad_token_id,
                       state_file=none, progress=args.progress)
        qat_s = time.perf_counter() - t0
        out[f"qat-{objective}"] = {"acc": accuracy(model, tok, args.limit), "seconds": round(ptq_s + qat_s, 2),
                                   "loss_first": tr["losses"][0], "loss_last": tr["losses"][-1]}
    # +rl continues from the qat-kd model just measured
    task = ArithTask(ArithConfig(name="arith"))
    t0 = time.perf_counter()
    g = train_grpo(model, tok, task, cfg, device=torch.device("cpu"), state_file=none, progress=args.progress)
    rl_s = time.perf_counter() - t0
    out["qat-kd+rl"] = {"acc": accuracy(model, tok, args.limit),
                        "seconds": round(out["qat-kd"]["seconds"] + rl_s, 2), "rewards": g["rewards"]}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--limit", type=int, default=200, help="held-out problems evaluated")
    ap.add_argument("--n-samples", type=int, default=16, help="rows of 512 tokens of toy documents (calib=toy)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--rl-steps", type=int, default=15)
    ap.add_argument("--rl-prompts", type=int, default=8)
    ap.add_argument("--rl-group", type=int, default=8)
    ap.add_argument("--rl-lr", type=float, default=1e-5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--progress", action="store_true")
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
    for bits in args.bits:
        for seed in args.seeds:
            r = run_one(base, tok, bits, seed, args)
            report["runs"].append(r)
            out_path.write_text(json.dumps(report, indent=1) + "\n")
            print(json.dumps({k: (v if not isinstance(v, dict) else {kk: vv for kk, vv in v.items() if kk != "rewards"})
                              for k, v in r.items()}), flush=True)
    print(f"\nfp accuracy {report['fp_acc']:.3f} on {args.limit} held-out toy problems")
    print(f"{'variant':<12}" + "".join(f"{'W%d g128' % b:>24}" for b in args.bits))
    for v in ("ptq", "qat-sft", "qat-kd", "qat-kd+rl"):
        row = f"{v:<12}"
        for b in args.bits:
            runs = [r[v] for r in report["runs"] if r["bits"] == b]
            accs = [x["acc"] for x in runs]
            sd = statistics.pstdev(accs) if len(accs) > 1 else 0.0
            row += f"{statistics.mean(accs):>10.3f} ± {sd:.3f} {statistics.mean(x['seconds'] for x in runs):>6.0f}s"
        print(row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
