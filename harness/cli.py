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

SUMMARY_COLUMNS = ["method", "bits", "group_size", "task", "acc", "tokens_mean", "truncation_rate"]


def summary_row(result: dict) -> dict:
    m = result["metrics"]
    act = {"act_bits": result["act_bits"]} if result.get("act_bits") else {}
    return {"method": result["method"], "bits": result["bits"], **act, "group_size": result["group_size"],
            "task": result["task"], "seed": result["seed"], "acc": m.get("acc"),
            "tokens_mean": m.get("tokens_mean"), "truncation_rate": m.get("truncation_rate")}


def print_summary(result: dict) -> None:
    import pandas as pd
    df = pd.DataFrame([summary_row(result)])
    extra = {k: v for k, v in result["metrics"].items() if k.startswith(("pass@", "maj@")) or "/" in k}
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


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _app(cfg: DictConfig) -> None:
    try:
        result = execute(cfg)
    except UserError as e:
        print(f"rqbench: error: {e}", file=sys.stderr)
        sys.exit(2)
    print_summary(result)


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _app()


if __name__ == "__main__":
    main()
