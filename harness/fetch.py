"""`rqbench-fetch <overrides>`: download everything a run or a sweep needs, on a machine with network (a login
node), so compute jobs can run with HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1 from the shared HF cache.

    rqbench-fetch experiment=qrm                     # every model, tokenizer and dataset of the 36-job preset
    rqbench-fetch --dry-run experiment=quantlrm_w3   # list them only

The sweep is expanded as Hydra would (the preset's `hydra.sweeper.params` and comma lists on the command line),
each job's config is validated, and what it reads from the hub is fetched through the same code paths the runs use:
model and base-model snapshots (weights, tokenizer, configs) with `huggingface_hub.snapshot_download`, task data
through the task's own loader (`task.examples()`), hub calibration text through harness.calib. Local paths and
the toy zoo need nothing. Every item is attempted; failures are listed at the end (exit status 1).
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

from harness.types import UserError


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """The override list of every job of the multirun these overrides (and their preset's sweeper params) describe."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from harness.cli import CONF_DIR
    parser = OverridesParser.create()
    given = parser.parse_overrides(overrides)
    fixed = [o.input_line for o in given if not o.is_sweep_override()]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=fixed, return_hydra_config=True)
    params = dict(cfg.hydra.sweeper.get("params") or {})
    axes: dict[str, list[str]] = {k: [f"{k}={v}"] for k, v in params.items()}
    for key, value in params.items():
        [o] = parser.parse_overrides([f"{key}={value}"])
        if o.is_sweep_override():
            axes[key] = [f"{key}={v}" for v in o.sweep_string_iterator()]
    for o in given:                          # the command line wins over the preset, as in Hydra
        key = o.get_key_element()
        axes[key] = [f"{key}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override() else [o.input_line]
    return [list(combo) for combo in itertools.product(*axes.values())] if axes else [[]]


def needs(job: list[str]) -> list[tuple]:
    """What one job reads from the hub: ("model", id, revision), ("task", overrides), ("calib", overrides)."""
    from hydra import compose, initialize_config_dir
    from harness.cli import CONF_DIR
    from harness.config import validate
    from harness.toy.build import TOY_MODELS
    # backend=auto accepts either backend's keys and needs no vLLM here (a login node rarely has it)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*job, "backend=auto"])
    spec = validate(cfg)
    out = []
    for name, revision in ((spec.model.path or spec.model.name, spec.model.revision),
                           (spec.model.base, None), (getattr(spec.method_cfg, "base_model", None), None)):
        if name and name not in TOY_MODELS and not Path(name).expanduser().exists():
            out.append(("model", name, revision))
    out.append(("task", spec.task_cls.name, spec.task_cls, spec.task_cfg))
    if getattr(spec.method_cls, "uses_calibration", False) and spec.calib is not None:
        from harness.calib import HUB_DEFAULTS, as_calib_config
        c = as_calib_config(spec.calib)
        if c.name in HUB_DEFAULTS and (c.name != "reasoning" or c.prompts == "hub"):
            out.append(("calib", c.name, c))
    return out


def describe(item: tuple) -> str:
    if item[0] == "model":
        return f"model {item[1]}" + (f" @ {item[2]}" if item[2] else "")
    if item[0] == "task":
        return f"task {item[1]}" + (f" (local files {item[3].data_files})" if getattr(item[3], "data_files", None) else "")
    return f"calib {item[1]}" + (f" ({item[2].dataset})" if item[2].dataset else "")


def fetch(item: tuple) -> str:
    """Download one item into the HF caches; returns a short note."""
    kind = item[0]
    if kind == "model":
        from huggingface_hub import snapshot_download
        path = snapshot_download(repo_id=item[1], revision=item[2])
        return str(path)
    if kind == "task":
        task = item[2](item[3])
        if getattr(item[3], "data_files", None):
            return "local files: nothing to download"
        if hasattr(task, "evaluate_model"):
            return "lm-eval task: its datasets download on first use"
        return f"{len(task.examples())} examples cached"
    from harness.calib import _hub_texts
    c = item[2]
    texts = _hub_texts(c, c.prompt_key if c.name == "reasoning" else c.text_key)
    return f"{len(texts)} texts cached"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="rqbench-fetch", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="list what would be downloaded, download nothing")
    ap.add_argument("overrides", nargs="*", help="rqbench overrides, as for `rqbench -m` (comma lists sweep)")
    args = ap.parse_args(argv)
    if os.environ.get("HF_HUB_OFFLINE") == "1" and not args.dry_run:
        print("rqbench-fetch: HF_HUB_OFFLINE=1 is set here; run it where the hub is reachable (unset it)", file=sys.stderr)
        return 2
    try:
        jobs = expand_sweep(args.overrides)
        items: dict[str, tuple] = {}
        for job in jobs:
            for item in needs(job):
                items.setdefault(describe(item), item)
    except UserError as e:
        print(f"rqbench-fetch: error: {e}", file=sys.stderr)
        return 2
    print(f"{len(jobs)} job(s) need {len(items)} item(s):")
    failed = []
    for what, item in items.items():
        if args.dry_run:
            print(f"  {what}")
            continue
        try:
            note = fetch(item)
            print(f"  ok      {what}: {note}", flush=True)
        except Exception as e:      # every item is tried; the list of failures says what is missing
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            print(f"  FAILED  {what}: {first}", flush=True)
            failed.append(what)
    if failed:
        print(f"rqbench-fetch: {len(failed)} of {len(items)} item(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    if not args.dry_run:
        print("done: compute jobs can run with HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 (same HF_HOME)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
