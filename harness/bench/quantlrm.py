"""Toy accuracy of QuantLRM against RTN / AWQ / GPTQ and its own ablations: `python -m harness.bench.quantlrm`.

Every cell is a normal rqbench run (Hydra config composed in-process, `harness.cli.execute`): the toy
reasoning model quantized at each spec, greedy-decoded on the arith task's held-out problems, scored.
The (toy-base, toy) pair is first copied to `<results-dir>/frozen/` under its weights digest and every
run reads that copy (`model.path`, `model.base`, `model.name=toy-<digest>`): a toy retrained while the
benchmark runs cannot mix two models into one table.
Toy decoding is greedy, so the seeds are *calibration* seeds (`calib.seed`, which also names the
run directory through `seed`); RTN uses no calibration and runs once per spec. Checkpoints and
samples are cached like any run, so an interrupted benchmark resumes where it stopped.

Variants (method + overrides):
  quantlrm             signals from the real (toy-base -> toy) pair, all four groups
  quantlrm-quadratic   importance = mean y only          quantlrm-zeros   zero count + 1 only
  quantlrm-activation  activation magnitude through QuantLRM's search (no normalisation) = plain AWQ
  quantlrm-o-down      only o and down scaled (the authors' OLMo-3 setting)
  quantlrm-pft         no pair: pseudo fine-tune of the toy on its own reasoning traces
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

SPECS = {"w2g128": (2, 128), "w3g128": (3, 128), "w4g128": (4, 128), "w3g32": (3, 32), "w2g32": (2, 32)}
# Pseudo fine-tuning scaled to the toy (0.8M parameters, trained at lr 1e-3..3e-3, ~50-token traces).
TOY_PFT = ["method.pseudo_finetune=true", "method.pft.prompts=toy", "method.pft.n_samples=16",
           "method.pft.seq_len=1024", "method.pft.max_new_tokens=128", "method.pft.steps=64",
           "method.pft.batch_size=16", "method.pft.lr=1e-4", "method.pft.warmup=6"]
VARIANTS = {
    "rtn": ("rtn", []),
    "awq": ("awq", []),
    "gptq": ("gptq", []),
    "quantlrm": ("quantlrm", []),
    "quantlrm-quadratic": ("quantlrm", ["method.importance=quadratic"]),
    "quantlrm-zeros": ("quantlrm", ["method.importance=zeros"]),
    "quantlrm-activation": ("quantlrm", ["method.importance=activation"]),
    "quantlrm-o-down": ("quantlrm", ["method.groups=[o,down]"]),
    "quantlrm-pft": ("quantlrm", TOY_PFT),
}


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose, initialize_config_dir
    from harness.cli import CONF_DIR
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def freeze_toys(root: Path) -> dict:
    """Copies of the toy pair named by their weights digest: {"name", "toy", "base", "digest", "base_digest"}."""
    import shutil
    from harness.toy.build import ensure_toy, weights_digest
    out = {}
    for key, name in (("toy", "toy"), ("base", "toy-base")):
        src = ensure_toy(name)
        digest = weights_digest(src)
        dst = root / f"{name}-{digest[:12]}"
        if not dst.is_dir():
            tmp = root / f".{dst.name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(src, tmp)
            if weights_digest(tmp) != digest:
                raise SystemExit(f"{src} changed while it was being copied; run the benchmark again")
            tmp.rename(dst)
        out[key], out["digest" if key == "toy" else "base_digest"] = str(dst.resolve()), digest
    out["name"] = f"toy-{out['digest'][:8]}"
    return out


def run_one(variant: str, spec: str | None, seed: int, a, toys: dict) -> dict:
    from harness.cli import execute
    method, extra = VARIANTS[variant] if variant != "fp" else ("fp", [])
    over = [f"method={method}", "model=toy", f"model.name={toys['name']}", f"model.path={toys['toy']}",
            f"model.base={toys['base']}", "task=arith", "calib=toy", "backend=hf", "device=cpu",
            f"results_dir={a.results_dir}", f"seed={seed}", f"calib.seed={seed}", "progress=false", *extra]
    if a.limit:
        over.append(f"task.limit={a.limit}")
    if variant != method:
        over.append(f"run_tag={variant.removeprefix(method + '-')}")
    if spec:
        bits, group = SPECS[spec]
        over += [f"quant.bits={bits}", f"quant.group_size={group}"]
    t0 = time.perf_counter()
    result = execute(compose(over))
    return {"variant": variant, "spec": spec, "seed": seed, "acc": result["metrics"]["acc"],
            "quantize_s": result["seconds"].get("quantize"), "cached": result["checkpoint"].get("cached"),
            "wall_s": round(time.perf_counter() - t0, 1)}


def format_table(rows: list[dict], specs: list[str], variants: list[str]) -> str:
    def cell(v, s):
        accs = [r["acc"] for r in rows if r["variant"] == v and r["spec"] == s]
        if not accs:
            return "-"
        mean = statistics.fmean(accs)
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        return f"{100 * mean:.1f} ± {100 * sd:.1f} ({', '.join(f'{100 * x:.1f}' for x in accs)})"
    head = "| method | " + " | ".join(f"{s} acc % (mean ± sd (per seed))" for s in specs) + " |"
    lines = [head, "|" + "---|" * (len(specs) + 1)]
    fp = [r["acc"] for r in rows if r["variant"] == "fp"]
    if fp:
        lines.append("| fp | " + " | ".join(f"{100 * fp[0]:.1f}" for _ in specs) + " |")
    for v in variants:
        lines.append(f"| {v} | " + " | ".join(cell(v, s) for s in specs) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m harness.bench.quantlrm", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--specs", default="w3g128,w2g128", help=f"comma list of {', '.join(SPECS)}")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--seeds", default="0,1,2", help="calibration seeds (calib.seed)")
    ap.add_argument("--limit", type=int, default=None, help="task.limit: evaluate only the first N problems")
    ap.add_argument("--results-dir", default="results/bench/quantlrm")
    ap.add_argument("--out", default="results/bench/quantlrm.json")
    a = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    specs, variants = a.specs.split(","), a.variants.split(",")
    seeds = [int(s) for s in a.seeds.split(",")]
    for name in variants:
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}; allowed: {', '.join(VARIANTS)}")
    for name in specs:
        if name not in SPECS:
            raise SystemExit(f"unknown spec {name!r}; allowed: {', '.join(SPECS)}")
    jobs = [("fp", None, 0)] + [(v, s, seed) for s in specs for v in variants
                                for seed in (seeds[:1] if v == "rtn" else seeds)]
    toys = freeze_toys(Path(a.results_dir) / "frozen")
    print(f"[bench] toy {toys['digest'][:12]} (base {toys['base_digest'][:12]}), frozen at {toys['toy']}",
          file=sys.stderr, flush=True)
    rows = []
    for i, (v, s, seed) in enumerate(jobs, 1):
        print(f"[bench] {i}/{len(jobs)} {v} {s or ''} calib seed {seed} ...", file=sys.stderr, flush=True)
        row = run_one(v, s, seed, a, toys)
        rows.append(row)
        print(f"[bench]   acc {row['acc']:.4f} (quantize {row['quantize_s'] or 0:.1f}s, "
              f"{'cached' if row['cached'] else 'built'}, wall {row['wall_s']}s)", file=sys.stderr, flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"setup": vars(a), "toys": toys, "rows": rows}, indent=1) + "\n")
    print(f"toy weights {toys['digest'][:12]}, toy-base {toys['base_digest'][:12]}; "
          f"{a.limit or 'all'} arith problems; seeds = calib.seed")
    print(format_table(rows, specs, variants))
    print(f"\n[bench] wrote {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
