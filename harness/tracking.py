"""Weights & Biases mirror of the plain result files (`tracking.wandb.mode=disabled|offline|online`).

The files under results/ are the record; W&B only mirrors them, after they are written. Anything
that goes wrong here — wandb not installed, not logged in, no network, a bad entity — prints ONE
warning per process and is otherwise ignored (later runs in the same process skip W&B quietly), so
tracking can never lose or block a result.

- one W&B run per rqbench run: id derived from the run's config hash and its directory, so a
  requeued Slurm job continues the same W&B run (`resume="allow"`); name = the run directory;
  group = `tracking.wandb.group`, else the experiment preset, else the Hydra sweep; job_type
  "eval"; tags model / method / w<bits> / g<group> / task / seed<k>;
- logged: the resolved config, every scalar metric (breakdowns as `acc_by_x/<value>`), stage
  times, and a `samples` table (prompt, completion, parsed, gold, correct, tokens, truncated);
- `rqbench-report --wandb offline|online` logs the report tables and plots as a "report" run of
  the sweep's group.

offline mode writes under `<results_dir>/.wandb/` (or $WANDB_DIR); upload later with
`wandb sync <that dir>/wandb/offline-run-*`.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Iterable

from harness.store import stable_hash

MODES = ("disabled", "offline", "online")
TEXT_CAP = 20_000           # characters of a prompt/completion in the W&B table (the full text is in samples.jsonl)
SAMPLE_COLUMNS = ["id", "sample", "seed", "prompt", "completion", "parsed", "gold", "correct", "parsed_strict",
                  "correct_strict", "unfinished", "n_tokens", "truncated", "finish_reason"]

_state = {"warned": False, "broken": False}


def _warn(msg: str) -> None:
    if not _state["warned"]:
        print(f"[rqbench] warning: W&B tracking is off for this process: {msg}. "
              f"Local results are complete and unaffected.", file=sys.stderr, flush=True)
    _state["warned"] = True


def _import_wandb(mode: str):
    try:
        import wandb
    except ImportError:
        raise RuntimeError(f"tracking.wandb.mode={mode} but wandb is not installed (pip install -e \".[wandb]\")") from None
    if mode == "online" and not os.environ.get("WANDB_API_KEY"):
        # Never the interactive login prompt: a batch job would hang on it.
        if not wandb.login(prompt=False, verify=False):
            raise RuntimeError("not logged in (run `wandb login` or set WANDB_API_KEY), or use mode=offline")
    return wandb


def _settings(wandb):
    return wandb.Settings(console="off", init_timeout=30, finish_timeout=60, x_disable_stats=True)


def _guarded(fn, *args, **kwargs) -> bool:
    if _state["broken"]:
        return False
    try:
        fn(*args, **kwargs)
        return True
    except Exception as e:
        _state["broken"] = True
        _warn(f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}")
        return False


def flatten(d: dict, prefix: str = "") -> dict:
    """Scalars of a nested dict, keys joined with '/' (bools and None dropped)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = v
    return out


def _cap(text: Any) -> Any:
    if isinstance(text, str) and len(text) > TEXT_CAP:
        return text[:TEXT_CAP // 2] + f"\n…[{len(text) - TEXT_CAP} characters cut; full text in samples.jsonl]…\n" \
            + text[-TEXT_CAP // 2:]
    return text


def sample_rows(samples_path: Path) -> list[list]:
    rows = []
    if samples_path.is_file():
        with samples_path.open(encoding="utf-8") as f:
            for line in f:
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    break                   # a torn last line: the store repairs it on the next open
                rows.append([_cap(r.get(c)) if c in ("prompt", "completion") else r.get(c) for c in SAMPLE_COLUMNS])
    return rows


def run_id(out_dir: Path, results_dir: Path) -> str:
    """Stable W&B id of a run: its config digest (run_key.json) and its place under results_dir."""
    try:
        rel = str(Path(out_dir).resolve().relative_to(Path(results_dir).resolve()))
    except ValueError:
        rel = str(out_dir)
    key_file = Path(out_dir) / "run_key.json"
    digest = json.loads(key_file.read_text()).get("digest") if key_file.is_file() else None
    return "rq-" + stable_hash([rel, digest])


def sweep_group(configured: str | None) -> str | None:
    """The W&B group: configured, else the experiment preset's name, else the Hydra sweep's directory."""
    if configured:
        return configured
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
        if not HydraConfig.initialized():
            return None
        hc = HydraConfig.get()
        experiment = hc.runtime.choices.get("experiment")
        if experiment:
            return str(experiment)
        if hc.mode == RunMode.MULTIRUN:
            return "sweep-" + Path(hc.sweep.dir).name
    except Exception:
        return None
    return None


def run_tags(result: dict) -> list[str]:
    tags = [str(result.get("model")), str(result.get("method")), f"w{result.get('bits')}", str(result.get("task")),
            f"seed{result.get('seed')}"]
    if result.get("group_size") is not None:
        tags.insert(3, f"g{result['group_size']}")
    return [t[:64] for t in tags]


def _wandb_dir(results_dir: Path) -> str | None:
    if os.environ.get("WANDB_DIR"):
        return None                         # wandb honours it itself
    d = Path(results_dir) / ".wandb"
    d.mkdir(parents=True, exist_ok=True)
    return str(d)


def log_run(spec, cfg_dict: dict, result: dict, out_dir: Path) -> bool:
    """Mirror one finished run to W&B. Returns True when logged; never raises."""
    wb = spec.top.tracking.wandb
    if wb.mode == "disabled":
        return False
    return _guarded(_log_run, wb, Path(spec.top.results_dir), cfg_dict, result, Path(out_dir))


def _log_run(wb, results_dir: Path, cfg_dict: dict, result: dict, out_dir: Path) -> None:
    wandb = _import_wandb(wb.mode)
    try:
        name = str(out_dir.resolve().relative_to(results_dir.resolve()))
    except ValueError:
        name = str(out_dir)
    run = wandb.init(project=wb.project, entity=wb.entity, id=run_id(out_dir, results_dir), name=name,
                     group=sweep_group(wb.group), job_type="eval", tags=run_tags(result), config=cfg_dict,
                     dir=_wandb_dir(results_dir), mode=wb.mode, resume="allow" if wb.mode == "online" else None,
                     settings=_settings(wandb), reinit="finish_previous")
    try:
        summary = flatten(result.get("metrics", {}))
        summary.update(flatten({"seconds": result.get("seconds", {}), "memory": result.get("memory", {})}))
        summary["tokens_generated"] = result.get("tokens_generated", 0)
        rows = sample_rows(out_dir / "samples.jsonl")
        payload: dict = dict(summary)
        if rows:
            payload["samples"] = wandb.Table(columns=SAMPLE_COLUMNS, data=rows)
        run.log(payload)
        run.summary.update(summary)
    finally:
        run.finish()


def log_report(mode: str, project: str, entity: str | None, group: str | None, root: Path,
               tables: dict, images: Iterable[Path]) -> bool:
    """Mirror a report (DataFrames and PNGs) to W&B as a 'report' run of `group`. Never raises."""
    if mode == "disabled":
        return False
    if mode not in MODES:
        _warn(f"mode={mode!r} is not one of {', '.join(MODES)}")
        return False
    return _guarded(_log_report, mode, project, entity, group, Path(root), tables, list(images))


def _log_report(mode, project, entity, group, root: Path, tables: dict, images: list[Path]) -> None:
    wandb = _import_wandb(mode)
    run = wandb.init(project=project, entity=entity, id="rq-report-" + stable_hash([group, str(root.resolve())]),
                     name=f"report {group or root.name}", group=group, job_type="report",
                     dir=_wandb_dir(root), mode=mode, resume="allow" if mode == "online" else None,
                     settings=_settings(wandb), reinit="finish_previous")
    try:
        payload = {}
        for name, df in tables.items():
            if df is not None and not df.empty:
                payload[f"table/{name}"] = wandb.Table(dataframe=df.reset_index(drop=True))
        for img in images:
            payload[f"plot/{Path(img).stem}"] = wandb.Image(str(img))
        run.log(payload)
    finally:
        run.finish()
