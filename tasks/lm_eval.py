"""lm-evaluation-harness passthrough: run lm-eval tasks (wikitext, arc_easy, ...) on the in-memory model.

The pipeline calls `evaluate_model` instead of generate/score for this task, with the model as
quantized (no export/reload round trip), wrapped in lm-eval's HFLM. Metrics come back flat as
"<lm-eval task>/<metric>" (a non-default filter adds "/<filter>").
"""
from __future__ import annotations

import contextlib
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from harness.registry import register_task
from harness.tasks_base import BaseTask, TaskConfig
from harness.types import Example, UserError


@dataclass
class LmEvalConfig(TaskConfig):
    names: list[str] = field(default_factory=lambda: ["wikitext"])   # lm-eval task / group / tag names
    include_path: Optional[str] = None      # a directory of your own lm-eval task YAMLs
    include_defaults: Optional[bool] = None   # null: only when include_path is unset (indexing lm-eval's
                                              # 14k built-in tasks takes ~8 s)
    num_fewshot: Optional[int] = None       # null: each task's own default
    batch_size: int = 8
    max_length: Optional[int] = None        # null: from the model config
    apply_chat_template: bool = False
    think_end_token: Optional[str] = None   # e.g. "</think>": generate_until tasks then score only the answer
    log_samples: bool = True                # per-sample records under <run dir>/lm_eval_samples/
    bootstrap_iters: int = 1000             # stderr of bootstrapped metrics; lm-eval's 100000 takes minutes
    seed: int = 0                           # the run seed (the YAML sets ${seed}): python/numpy/torch/few-shot


def flatten_metrics(results: dict) -> dict[str, float]:
    """lm-eval's {"results": {task: {"acc,none": .., "alias": ..}}} -> {"task/acc": ..}."""
    out: dict[str, float] = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue          # "alias", and stderr "N/A" where none was computed
            metric, _, filt = key.partition(",")
            out[f"{task}/{metric}" + ("" if filt in ("", "none") else f"/{filt}")] = float(value)
    return out


@register_task("lm_eval")
class LmEvalTask(BaseTask):
    Config = LmEvalConfig

    def __init__(self, cfg: LmEvalConfig):
        super().__init__(cfg)
        if not cfg.names or not all(isinstance(n, str) and n for n in cfg.names):
            raise UserError(f"task.names={cfg.names!r} is not allowed; allowed: a non-empty list of lm-eval task "
                            f"names, e.g. task.names=[wikitext,arc_easy]")
        if cfg.include_path is not None and not Path(cfg.include_path).expanduser().is_dir():
            raise UserError(f"task.include_path={cfg.include_path!r}: no such directory; allowed: a directory "
                            f"of lm-eval task YAML files, or null")
        if cfg.batch_size < 1:
            raise UserError(f"task.batch_size={cfg.batch_size!r} is not allowed; allowed: an integer >= 1")
        if cfg.num_fewshot is not None and cfg.num_fewshot < 0:
            raise UserError(f"task.num_fewshot={cfg.num_fewshot!r} is not allowed; allowed: an integer >= 0 or null")

    # Not a generate/score task: the pipeline calls evaluate_model when a task has it.
    def load(self) -> list[Example]:
        raise UserError("task lm_eval has no examples of its own: lm-eval runs it through evaluate_model")

    def _task_manager(self):
        from lm_eval.tasks import TaskManager
        cfg = self.cfg
        include = str(Path(cfg.include_path).expanduser().resolve()) if cfg.include_path else None
        defaults = cfg.include_defaults if cfg.include_defaults is not None else include is None
        if include is None and not defaults:
            raise UserError("task.include_defaults=false needs task.include_path=<dir of task YAMLs>: "
                            "otherwise no task is known")
        searched = ", ".join(([include] if include else []) + (["lm-eval's built-in tasks"] if defaults else []))
        return TaskManager(include_path=include, include_defaults=defaults), include, searched

    def _load_tasks(self, tm, include: str | None, searched: str) -> list:
        """Build the lm-eval task objects (this is when their datasets are loaded)."""
        objs = []
        for name in self.cfg.names:
            if Path(name).is_file():
                name = str(Path(name).resolve())      # a YAML path, made immune to the chdir below
            elif name not in tm.all_tasks:
                close = difflib.get_close_matches(name, tm.all_tasks, n=5)
                raise UserError(f"task.names: {name!r} is not an lm-eval task, group or tag (searched: {searched})"
                                + (f"; did you mean: {', '.join(close)}" if close else ""))
            # Relative data_files in an include YAML resolve against the working directory in lm-eval;
            # resolve them against the YAML's own directory instead, so a task dir works from anywhere.
            try:
                with contextlib.chdir(include) if include else contextlib.nullcontext():
                    loaded = tm.load([name])
            except Exception as e:      # datasets/hub errors come in many types
                raise UserError(f"task.names: lm-eval could not load {name!r}: {type(e).__name__}: "
                                f"{str(e).splitlines()[0][:300] if str(e) else ''}\n  If this machine is offline, "
                                f"write a task YAML over a local copy of the data and pass "
                                f"task.include_path=<its directory>") from None
            # One name is a task, a group (kept whole: lm-eval aggregates it) or a tag (its tasks).
            objs += [loaded["groups"][name]] if name in loaded["groups"] else list(loaded["tasks"].values())
        return objs

    def evaluate_model(self, model, tokenizer, out_dir) -> dict[str, float]:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        cfg = self.cfg
        tm, include, searched = self._task_manager()
        tasks = self._load_tasks(tm, include, searched)
        extra = {} if cfg.enable_thinking is None else {"enable_thinking": cfg.enable_thinking}
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size, max_length=cfg.max_length,
                  think_end_token=cfg.think_end_token, **extra)
        results = simple_evaluate(
            model=lm, tasks=tasks, task_manager=tm, num_fewshot=cfg.num_fewshot, limit=cfg.limit,
            log_samples=cfg.log_samples, apply_chat_template=cfg.apply_chat_template,
            bootstrap_iters=cfg.bootstrap_iters, random_seed=cfg.seed, numpy_random_seed=cfg.seed,
            torch_random_seed=cfg.seed, fewshot_random_seed=cfg.seed)
        if out_dir is not None:
            self._write(results, Path(out_dir))
        return flatten_metrics(results)

    @staticmethod
    def _write(results: dict, out_dir: Path) -> None:
        from harness.store import write_json_atomic
        samples = results.pop("samples", None) or {}
        write_json_atomic(out_dir / "lm_eval_results.json", results)
        for task, recs in samples.items():
            path = out_dir / "lm_eval_samples" / f"{task}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("w", encoding="utf-8") as f:
                for r in recs:
                    f.write(json.dumps(r, default=str, ensure_ascii=False) + "\n")
