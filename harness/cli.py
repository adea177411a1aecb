"""`rqbench`: the Hydra app. One job = one (model, method, quant, task, seed) run."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from harness.types import UserError

# The repo's conf/ (the package is installed editable, so it sits beside harness/).
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")

SUMMARY_COLUMNS = ["method", "bits", "group_size", "task", "acc", "acc_strict", "tokens_mean", "truncation_rate"]


def summary_row(result: dict) -> dict:
    m = result["metrics"]
    act = {"act_bits": result["act_bits"]} if result.get("act_bits") else {}
    return {"method": result["method"], "bits": result["bits"], **act, "group_size": result["group_size"],
            "task": result["task"], "seed": result["seed"], "acc": m.get("acc"), "acc_strict": m.get("acc_strict"),
            "tokens_mean": m.get("tokens_mean"), "truncation_rate": m.get("truncation_rate")}


def print_summary(result: dict) -> None:
    import pandas as pd
    df = pd.DataFrame([summary_row(result)])
    extra = {k: v for k, v in result["metrics"].items() if k.startswith(("pass@", "maj@", "ppl")) or "/" in k}
    print(df.to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    if extra:
        print("  " + "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in extra.items()))
    secs = ", ".join(f"{k} {v:.1f}s" for k, v in result["seconds_this_invocation"].items())
    print(f"  time: {secs}; tokens generated: {result['tokens_generated']}; "
          f"peak RSS {result['memory']['peak_rss_mb']:.0f} MB")


def execute(cfg: DictConfig) -> dict:
    from harness.config import validate
    from harness.pipeline import run
    spec = validate(cfg)
    cfg_dict = OmegaConf.to_container(cfg, resolve=True)
    cfg_dict.pop("hydra", None)
    return run(spec, cfg_dict, run_tag=spec.top.run_tag)


_failed: list[str] = []     # jobs of this process's multirun that stopped with a UserError


def _multirun_job_dir() -> Path | None:
    """Hydra's output directory of this job when it is one job of a multirun (else None)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            return Path(HydraConfig.get().runtime.output_dir)
    except Exception:
        return None
    return None


def record_error(job_dir: Path, e: UserError) -> Path:
    """error.json beside Hydra's per-job config: what failed, with which overrides (a sweep goes on)."""
    from hydra.core.hydra_config import HydraConfig
    from harness.store import write_json_atomic
    hc = HydraConfig.get()
    path = job_dir / "error.json"
    write_json_atomic(path, {"error": str(e), "type": type(e).__name__, "job": hc.job.num,
                             "overrides": list(hc.overrides.task)})
    return path


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _app(cfg: DictConfig) -> None:
    try:
        result = execute(cfg)
    except UserError as e:
        job_dir = _multirun_job_dir()
        if job_dir is None:
            print(f"rqbench: error: {e}", file=sys.stderr)
            sys.exit(2)
        # One bad job of a sweep must not stop the others: record it and let the launcher go on.
        where = record_error(job_dir, e)
        print(f"rqbench: error (job recorded in {where}; the sweep goes on): {e}", file=sys.stderr)
        _failed.append(str(where))
        return
    if result.get("stage") == "quantize":
        print(f"stage=quantize {result['model']} {result['label']}: {result['status']}"
              + (f" ({result['checkpoint']})" if result.get("checkpoint") else ""))
        return
    print_summary(result)


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _app()
    if _failed:     # multirun with the local launcher: every job ran; say which did not finish
        print(f"rqbench: {len(_failed)} job(s) of this sweep stopped with an error: {', '.join(_failed)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
