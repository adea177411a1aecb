"""`rqbench-plan [-m] OVERRIDES`: what `rqbench [-m] OVERRIDES` would run, without loading any model.

One row per job of the sweep (Hydra's basic sweeper, expanded exactly as `rqbench -m` expands it): model,
method, bits, group, calibration, task/subset, seed, run directory and whether it is done, the quantized
checkpoint it needs and whether that is built, and the published number it will be compared with
(conf/references.csv; the preset's `reproduces` table first). Then the number of distinct checkpoints to
build and a rough GPU-hour estimate from the model sizes. A bad override fails as it fails in `rqbench`.
`--references=PATH` compares with another references CSV.
"""
from __future__ import annotations

import math
import re
import sys
from pathlib import Path

from omegaconf import OmegaConf

from harness.types import UserError

# Problems per task (each task's data: MATH-500 500, AIME 2022-25 120 (30 a year), GPQA-Diamond 198, FOLIO v0.0
# validation 204, BBH temporal_sequences 250); `task.limit` and the arith task's n_problems override.
N_PROBLEMS = {"math500": 500, "aime120": 120, "gpqa_diamond": 198, "folio": 204, "temporal_sequences": 250}
AIME_SUBSET = {"all": 120, "aime90": 90}
# The estimate's assumptions (stated in the output): a reasoning trace uses a quarter of its token budget on
# average, and one H100-class GPU generates THROUGHPUT_1B / (billions of parameters) tokens per second in a
# batched engine; a checkpoint costs QUANT_H_PER_B GPU-hours per billion parameters (calibration + search).
TRACE_FILL = 0.25
THROUGHPUT_1B = 30000.0
QUANT_H_PER_B = 0.02


def sweep_jobs(overrides: list[str], multirun: bool) -> list[list[str]]:
    """The override list of every job, as Hydra's basic sweeper builds them (the preset's hydra.sweeper.params,
    then the command line's, the latter winning per key)."""
    from hydra import compose
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra._internal.utils import create_config_search_path
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from harness.cli import CONF_DIR
    parser = OverridesParser.create(config_loader=ConfigLoaderImpl(create_config_search_path(CONF_DIR)))
    parsed = parser.parse_overrides(overrides)
    if not multirun:
        sweeps = [o.input_line for o in parsed if o.is_sweep_override()]
        if sweeps:
            raise UserError(f"{sweeps[0]!r} is a sweep: pass -m (as rqbench -m) to plan every job")
        return [overrides]
    plain = [o.input_line for o in parsed if not o.is_sweep_override()]
    cfg = compose(config_name="config", overrides=plain, return_hydra_config=True)
    params = [f"{k}={v}" for k, v in (cfg.hydra.sweeper.get("params") or {}).items()]
    [jobs] = BasicSweeper.split_arguments(parser.parse_overrides(params + overrides), None)
    return jobs


def params_billion(spec, source: str) -> float | None:
    """Parameters (billions): from a local config.json, else from a `<n>B` in the model name."""
    cfg = Path(source) / "config.json"
    if cfg.is_file():
        import json
        c = json.loads(cfg.read_text())
        h, layers, vocab = c.get("hidden_size"), c.get("num_hidden_layers"), c.get("vocab_size")
        inter = c.get("intermediate_size") or 4 * (h or 0)
        if h and layers and vocab:
            return (layers * (4 * h * h + 3 * h * inter) + 2 * vocab * h) / 1e9
    m = re.search(r"(\d+(?:\.\d+)?)[bB](?![a-zA-Z])", spec.model.name)
    return float(m.group(1)) if m else None


def n_problems(spec) -> int | None:
    cfg, name = spec.task_cfg, spec.task_cls.name
    n = getattr(cfg, "n_problems", None) if name == "arith" else N_PROBLEMS.get(name)
    if name == "aime120":
        n = AIME_SUBSET.get(cfg.subset, 30)
    if getattr(cfg, "limit", None):
        n = min(n, cfg.limit) if n else cfg.limit
    return n


def job_row(i: int, spec) -> dict:
    from harness import pipeline, references
    from harness.store import dir_state
    quantizes = getattr(spec.method_cls, "quantizes", True)
    out = pipeline.run_dir(spec, spec.top.run_tag)
    source = pipeline.model_source(spec)
    samples = out / "samples.jsonl"
    if (out / "metrics.json").exists():
        run_state = "done"
    elif samples.exists() and samples.stat().st_size:
        run_state = f"partial ({sum(1 for _ in samples.open(encoding='utf-8'))} samples)"
    else:
        run_state = "-"
    if quantizes:
        root, name, _ = pipeline.checkpoint_location(spec, source)
        state, _ = dir_state(root, name)
        ckpt, ckpt_state = name, {"complete": "built", "building": "building", "absent": "-"}[state]
    else:
        ckpt, ckpt_state = "(full precision)", "n/a"
    calib = pipeline.calib_descriptor(spec)
    desc = references.run_descriptor(
        model=spec.model.name, method=spec.method_cls.name, bits=spec.spec.bits if quantizes else 16,
        act_bits=spec.act.bits if spec.act is not None else None,
        group_size=spec.spec.group_size if quantizes else None, calib=calib, task=spec.task_cls.name,
        subset=pipeline.task_subset(spec))
    refs = _references()
    paper, table = (spec.top.reproduces.split("/", 1) + [None])[:2] if spec.top.reproduces else (None, None)
    found = references.find(refs, desc, paper=paper, table=table) if paper else references.find(refs, desc)
    ref = found.sort_values("n_seeds", ascending=False).iloc[0] if len(found) else None
    results = Path(spec.top.results_dir)
    return {
        "job": i, "model": spec.model.name.rstrip("/").split("/")[-1], "method": spec.method_cls.name,
        "bits": spec.spec.bits if quantizes else 16,
        "group": spec.spec.group_size if quantizes else "-",
        "calib": f"{calib['name']} {calib['n_samples']}x{calib['seq_len']}" if calib else "-",
        "task": spec.task_cls.name + (f"/{desc['subset']}" if desc["subset"] else ""), "seed": spec.top.seed,
        "run dir": str(out.relative_to(results)) if out.is_relative_to(results) else str(out), "run": run_state,
        "checkpoint": ckpt, "ckpt": ckpt_state,
        "reference": "-" if ref is None else f"{references.fmt_ref(ref)} {ref['paper']} {ref['table']}",
        "_ckpt_id": (spec.model.name, ckpt) if quantizes else None, "_ref": None if ref is None else ref.name,
        "_params_b": params_billion(spec, source), "_problems": n_problems(spec),
        "_tokens": spec.sampling.max_new_tokens * spec.sampling.n}


_REFS = None


def _references():
    global _REFS
    if _REFS is None:
        from harness import references
        _REFS = references.load()
    return _REFS


def estimate_gpu_hours(rows: list[dict]) -> tuple[float, float, int]:
    """(quantization hours, evaluation hours, jobs left out for an unknown size or problem count)."""
    quant, evaluate, unknown, seen = 0.0, 0.0, 0, set()
    for r in rows:
        b = r["_params_b"]
        if b is None or r["_problems"] is None:
            unknown += 1
            continue
        if r["_ckpt_id"] is not None and r["_ckpt_id"] not in seen:
            seen.add(r["_ckpt_id"])
            quant += QUANT_H_PER_B * b
        tokens = r["_problems"] * r["_tokens"] * TRACE_FILL
        evaluate += tokens / (THROUGHPUT_1B / max(b, 1e-3)) / 3600
    return quant, evaluate, unknown


def plan(overrides: list[str], multirun: bool) -> list[dict]:
    from hydra import compose, initialize_config_dir
    from harness.cli import CONF_DIR
    from harness.config import validate
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        jobs = sweep_jobs(overrides, multirun)
        specs = [validate(compose(config_name="config", overrides=list(job))) for job in jobs]
    return [job_row(i, s) for i, s in enumerate(specs)]


def render(rows: list[dict]) -> str:
    import pandas as pd
    shown = pd.DataFrame([{k: v for k, v in r.items() if not k.startswith("_")} for r in rows])
    ckpts = {r["_ckpt_id"] for r in rows if r["_ckpt_id"] is not None}
    built = {r["_ckpt_id"] for r in rows if r["_ckpt_id"] is not None and r["ckpt"] == "built"}
    matched = [r for r in rows if r["_ref"] is not None]
    done = sum(r["run"] == "done" for r in rows)
    q, e, unknown = estimate_gpu_hours(rows)
    lines = [shown.to_string(index=False), "",
             f"{len(rows)} jobs ({done} done), {len(ckpts)} distinct checkpoints to build ({len(built)} built), "
             f"{len(matched)} jobs matched a published number ({len({r['_ref'] for r in matched})} distinct)",
             f"GPU-hours (rough): {q + e:.1f} = quantize {q:.1f} + evaluate {e:.1f}"
             + (f" ({unknown} jobs of unknown size left out)" if unknown else "")
             + f"; assumes traces fill {TRACE_FILL:.0%} of max_new_tokens x n, {THROUGHPUT_1B:.0f}/B tokens/s per "
               f"GPU (B = billions of parameters), {QUANT_H_PER_B} h/B per checkpoint"]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    multirun = any(a in ("-m", "--multirun") for a in argv)
    refs = [a.split("=", 1)[1] for a in argv if a.startswith("--references=")]
    if refs:                    # another references CSV (e.g. numbers pinned with `python -m harness.references pin`)
        from harness import references
        global _REFS
        _REFS = references.load(Path(refs[-1]))
    overrides = [a for a in argv if a not in ("-m", "--multirun") and not a.startswith("--references=")]
    try:
        rows = plan(overrides, multirun)
    except UserError as e:
        print(f"rqbench-plan: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:          # Hydra's own errors (unknown group option, bad override syntax)
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException
        if not isinstance(e, (HydraException, OmegaConfBaseException)):
            raise
        print(f"rqbench-plan: error: {e}", file=sys.stderr)
        return 1
    print(render(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
