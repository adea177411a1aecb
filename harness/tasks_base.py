"""What every task plugin shares: its config schema, data loading (hub or local files), prompt rendering."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from harness.types import Example, Score, UserError

PROMPT_STYLES = ("chat", "raw_think")


@dataclass(frozen=True)
class Template:
    """A named prompt. `raw`: render() is the whole raw prompt (a paper's own "...<think>\\n" string),
    sent without a chat template; otherwise it is the user message (or, with prompt_style=raw_think,
    the text before "\\n<think>\\n")."""
    render: Any                 # Example -> str
    raw: bool = False
    source: str = ""            # where the exact bytes come from (file in the paper's code)


@dataclass
class SamplingDefaults:
    """A task's sampling defaults; the reasoning-model literature's unless a task says otherwise."""
    n: int = 1
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 0
    max_new_tokens: int = 32768


@dataclass
class TaskConfig:
    name: str = "???"
    data_files: Optional[Any] = None      # local jsonl/json/parquet path(s) instead of the hub
    revision: Optional[str] = None        # hub dataset revision (commit/tag)
    limit: Optional[int] = None           # evaluate only the first N examples (after any ordering)
    prompt_style: Optional[str] = None    # chat: model's chat template; raw_think: raw text ending "<think>\n";
                                          # null: the template's own (raw for a paper's raw prompts, else chat)
    enable_thinking: Optional[bool] = None   # passed to chat templates that support it
    template: str = "rqbench"             # named prompt template (each task lists its own: qrm, quantlrm, ...)
    source: str = "hub"                   # named data source (each task lists its own)
    lighteval_version: str = "0.8"        # grading of `correct`: 0.8 (the papers' pinned lighteval) | 0.11
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)


class BaseTask:
    """Subclasses set `Config`, `breakdown_keys`, `TEMPLATES`, `SOURCES`, and implement load/grade/grade_lighteval."""
    name: str
    Config = TaskConfig
    breakdown_keys: tuple[str, ...] = ()
    TEMPLATES: dict[str, Template] = {}     # name -> Template; empty: the task renders prompt_text itself
    SOURCES: tuple[str, ...] = ("hub",)     # named data sources (task.data_files replaces the download)

    def __init__(self, cfg: TaskConfig):
        from harness.scoring import check_lighteval_version
        if cfg.prompt_style is not None and cfg.prompt_style not in PROMPT_STYLES:
            raise UserError(f"task.prompt_style={cfg.prompt_style!r} is not allowed; allowed: "
                            f"{', '.join(PROMPT_STYLES)} or null (the template's own)")
        if cfg.limit is not None and cfg.limit < 1:
            raise UserError(f"task.limit={cfg.limit!r} is not allowed; allowed: a positive integer or null")
        if self.TEMPLATES and cfg.template not in self.TEMPLATES:
            raise UserError(f"task.template={cfg.template!r} is not allowed for task {self.name}; allowed: "
                            f"{', '.join(self.TEMPLATES)}")
        if cfg.source not in self.SOURCES:
            raise UserError(f"task.source={cfg.source!r} is not allowed for task {self.name}; allowed: "
                            f"{', '.join(self.SOURCES)}")
        tpl = self.TEMPLATES.get(cfg.template)
        if tpl is not None and tpl.raw and cfg.prompt_style == "chat":
            raise UserError(f"task.template={cfg.template!r} is a raw prompt (it ends in the paper's own "
                            f"\"<think>\\n\"), so task.prompt_style=chat cannot apply; allowed: null or raw_think")
        cfg.lighteval_version = check_lighteval_version(cfg.lighteval_version)
        self.cfg = cfg

    # --- the Task protocol -------------------------------------------------------------
    def examples(self) -> list[Example]:
        exs = self.load()
        return exs[: self.cfg.limit] if self.cfg.limit else exs

    def prompt(self, ex: Example) -> list[dict] | str:
        tpl = self.TEMPLATES.get(self.cfg.template)
        if tpl is not None and tpl.raw:
            return tpl.render(ex)
        text = self.prompt_text(ex)
        if self.cfg.prompt_style == "raw_think":
            return text + "\n<think>\n"
        return [{"role": "user", "content": text}]

    def prompt_text(self, ex: Example) -> str:
        """The user message (chat) or the text before "\\n<think>\\n" (raw_think)."""
        return self.TEMPLATES[self.cfg.template].render(ex)

    def score(self, ex: Example, completion: str, finish_reason: str = "stop", prompt: str = "") -> Score:
        """Both verdicts (harness/scoring.py: two_verdicts). `prompt`: the rendered prompt, which tells whether
        the model was thinking (a prompt ending in "<think>\\n") and holds a pre-closed think block."""
        from harness.scoring import two_verdicts
        return two_verdicts(prompt, completion, finish_reason, lambda text: self.grade(ex, text),
                            lambda text: self.grade_lighteval(ex, text), self.cfg.lighteval_version)

    def result_info(self) -> dict:
        """What a result must say about the task besides its config (e.g. the data version)."""
        return {"template": self.cfg.template, "source": self.cfg.source,
                "lighteval_version": self.cfg.lighteval_version}

    def example_for(self, answer, choices=None, ex_id: str = "") -> Example:
        """An Example carrying only a gold answer (what `rqbench-score` grades against), in the task's own form."""
        return Example(id=ex_id, question="", gold=str(answer).strip())

    # --- for subclasses ----------------------------------------------------------------
    def load(self) -> list[Example]:
        raise NotImplementedError

    def grade(self, ex: Example, answer_text: str) -> Score:
        """The strict rule: judge a final-answer text (reasoning already stripped)."""
        raise NotImplementedError

    def grade_lighteval(self, ex: Example, text: str) -> Score:
        """The lighteval-compatible rule: judge the text lighteval's metric reads (the whole completion)."""
        raise NotImplementedError

    def records(self, hub_id: str, hub_config: str | None, split: str) -> tuple[list[dict], str]:
        """(rows, where they came from): task.data_files when given, else the hub dataset."""
        if self.cfg.data_files:
            return read_local_records(self.cfg.data_files), "task.data_files"
        return load_hub_records(hub_id, hub_config, split, self.cfg.revision, self.name), hub_id



def read_local_records(data_files, key: str = "task.data_files") -> list[dict]:
    """Rows of local jsonl / json / parquet / csv files, in file order."""
    import pandas as pd
    import json

    paths = [data_files] if isinstance(data_files, (str, Path)) else list(data_files)
    rows: list[dict] = []
    for p in map(Path, paths):
        if not p.exists():
            raise UserError(f"{key}={str(p)!r}: no such file")
        suffix = p.suffix.lower()
        if suffix == ".jsonl":
            with p.open(encoding="utf-8") as f:
                rows += [json.loads(line) for line in f if line.strip()]
        elif suffix == ".json":
            obj = json.loads(p.read_text(encoding="utf-8"))
            rows += obj if isinstance(obj, list) else obj.get("examples", obj.get("data", []))
        elif suffix == ".parquet":
            rows += pd.read_parquet(p).to_dict("records")
        elif suffix == ".csv":
            rows += pd.read_csv(p).to_dict("records")
        else:
            raise UserError(f"{key}={str(p)!r}: unsupported file type {suffix!r}; allowed: .jsonl, .json, .parquet, .csv")
    return rows


def load_hub_records(path: str, name: str | None, split: str, revision: str | None, task: str) -> list[dict]:
    """Rows of a hub dataset; offline or gated failures become a message that says what to do."""
    try:
        import datasets
        ds = datasets.load_dataset(path, name, split=split, revision=revision)
    except Exception as e:  # the datasets library raises many types for "cannot reach / not allowed"
        raise UserError(
            f"task {task}: could not load the hub dataset {path!r}"
            f"{f' (config {name!r})' if name else ''}, split {split!r}: {type(e).__name__}: {str(e).splitlines()[0][:300]}\n"
            f"  If it is gated, accept its terms on the hub and run `hf auth login`; if this machine is offline, "
            f"download it elsewhere and pass task.data_files=<local .jsonl/.json/.parquet>") from None
    return [dict(r) for r in ds]
