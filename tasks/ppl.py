"""GPTQ-style perplexity: the PTQ papers' WikiText-2 / C4 numbers (SliderQuant Table 1, GPTQ, OmniQuant, AWQ).

As IST-DASLab/gptq datautils.py builds the test sets and llama.py `llama_eval` scores them:
- wikitext2: `wikitext`, config `wikitext-2-raw-v1`, split test; the rows' `text` joined by "\\n\\n" and tokenized
  once; the token stream cut into non-overlapping `seqlen` windows (the tail shorter than a window dropped).
- c4: `allenai/c4`, file `en/c4-validation.00000-of-00008.json.gz`; `random.seed(0)`, then 256 times: draw
  documents (random.randint over the rows) until one has >= seqlen tokens, and take a random seqlen window of
  it (random.randint(0, len - seqlen - 1)). OmniQuant's datautils.py samples C4 the same way.
- c4_new: GPTQ's "c4-new": the first 1100 validation documents joined by " ", the first 256 x seqlen tokens.
Per window: the mean next-token cross-entropy over its seqlen - 1 predictions, times seqlen; perplexity =
exp(sum / (windows x seqlen)) -- GPTQ's own arithmetic, kept so numbers compare.
GPTQ loads the slow tokenizer (use_fast=False); rqbench uses the model's tokenizer as loaded.

Offline: task.data_files = a .txt (the evaluated text as it is: WikiText-2's joined test text, or one C4
document per line for c4/c4_new) or .jsonl/.json/.parquet/.csv rows with a `text` field.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from harness.registry import register_task
from harness.tasks_base import BaseTask, TaskConfig, load_hub_records, read_local_records
from harness.types import Example, UserError

DATASETS = ("wikitext2", "c4", "c4_new")
WIKITEXT = ("wikitext", "wikitext-2-raw-v1", "test")
C4_FILE = "en/c4-validation.00000-of-00008.json.gz"


@dataclass
class PplConfig(TaskConfig):
    dataset: str = "wikitext2"      # wikitext2 | c4 | c4_new
    seqlen: int = 2048              # window length (tokens)
    n_windows: Optional[int] = None  # c4/c4_new: 256 (GPTQ); wikitext2: every full window. Fewer: a quick check
    batch_size: int = 1             # windows per forward pass (the result does not depend on it)


def _texts(rows: list[dict], where: str) -> list[str]:
    if rows and "text" not in rows[0]:
        raise UserError(f"{where}: rows need a `text` field; fields present: {', '.join(rows[0])}")
    return [str(r["text"]) for r in rows]


@register_task("ppl")
class PplTask(BaseTask):
    Config = PplConfig

    def __init__(self, cfg: PplConfig):
        super().__init__(cfg)
        if cfg.dataset not in DATASETS:
            raise UserError(f"task.dataset={cfg.dataset!r} is not allowed; allowed: {', '.join(DATASETS)}")
        if cfg.seqlen < 2:
            raise UserError(f"task.seqlen={cfg.seqlen!r} is not allowed; allowed: an integer >= 2")
        if cfg.n_windows is not None and cfg.n_windows < 1:
            raise UserError(f"task.n_windows={cfg.n_windows!r} is not allowed; allowed: a positive integer or null")
        if cfg.batch_size < 1:
            raise UserError(f"task.batch_size={cfg.batch_size!r} is not allowed; allowed: an integer >= 1")

    def load(self) -> list[Example]:
        raise UserError("task ppl has no examples: it scores the model directly (evaluate_model)")

    def result_info(self) -> dict:
        return {"dataset": self.cfg.dataset, "seqlen": self.cfg.seqlen,
                "data": self.cfg.data_files or {"wikitext2": "/".join(WIKITEXT), "c4": f"allenai/c4 {C4_FILE}",
                                                "c4_new": f"allenai/c4 {C4_FILE}"}[self.cfg.dataset]}

    # --- data ------------------------------------------------------------------------------
    def documents(self) -> list[str]:
        """The raw texts: local files, or the hub split GPTQ reads."""
        cfg = self.cfg
        if cfg.data_files:
            paths = [cfg.data_files] if isinstance(cfg.data_files, (str, Path)) else list(cfg.data_files)
            if all(str(p).endswith(".txt") for p in paths):
                text = "".join(Path(p).read_text(encoding="utf-8") if Path(p).exists() else _missing(p) for p in paths)
                return [text] if cfg.dataset == "wikitext2" else [t for t in text.split("\n") if t.strip()]
            return _texts(read_local_records(cfg.data_files), "task.data_files")
        if cfg.dataset == "wikitext2":
            return _texts(load_hub_records(*WIKITEXT, cfg.revision, self.name), WIKITEXT[0])
        try:
            import datasets
            ds = datasets.load_dataset("allenai/c4", data_files={"validation": C4_FILE}, split="validation",
                                       revision=cfg.revision)
        except Exception as e:
            raise UserError(f"task ppl: could not load allenai/c4 ({C4_FILE}): {type(e).__name__}: "
                            f"{str(e).splitlines()[0][:300]}\n  Offline: pass task.data_files=<jsonl with `text` "
                            f"rows of that file, in order>") from None
        return [str(t) for t in ds["text"]]

    def windows(self, tok) -> "torch.Tensor":
        """[n, seqlen] token windows, as GPTQ's datautils.py cuts them."""
        import torch
        cfg, L = self.cfg, self.cfg.seqlen
        docs = self.documents()
        if cfg.dataset == "wikitext2":
            # a local .txt is the joined text already; rows are joined as GPTQ joins the hub rows
            text = docs[0] if cfg.data_files and str(cfg.data_files).endswith(".txt") else "\n\n".join(docs)
            ids = tok(text, return_tensors="pt").input_ids
            n = ids.shape[1] // L
        elif cfg.dataset == "c4_new":
            ids = tok(" ".join(docs[:1100]), return_tensors="pt").input_ids[:, : 256 * L]
            n = ids.shape[1] // L
        else:
            ids = self._c4_windows(tok, docs, cfg.n_windows or 256)
            n = ids.shape[1] // L
        if cfg.n_windows is not None:
            n = min(n, cfg.n_windows)
        if n == 0:
            raise UserError(f"task ppl: the {cfg.dataset} text is {ids.shape[1]} tokens, shorter than one "
                            f"task.seqlen={L} window")
        return ids[0, : n * L].reshape(n, L)

    def _c4_windows(self, tok, docs: list[str], count: int):
        import torch
        L = self.cfg.seqlen
        rng = random.Random(0)     # GPTQ get_c4: random.seed(0) before the validation windows
        out, too_short = [], set()
        for _ in range(count):
            while True:
                k = rng.randint(0, len(docs) - 1)
                ids = tok(docs[k], return_tensors="pt").input_ids
                if ids.shape[1] >= L:
                    break
                too_short.add(k)
                if len(too_short) == len(docs):
                    raise UserError(f"task ppl: no C4 document is {L} tokens long; allowed: a smaller task.seqlen")
            if ids.shape[1] == L:       # GPTQ's randint(0, -1) fails here too: no faithful window exists
                raise UserError(f"task ppl: a C4 document is exactly task.seqlen={L} tokens, which GPTQ's "
                                f"sampling cannot handle; allowed: another task.seqlen")
            i = rng.randint(0, ids.shape[1] - L - 1)
            out.append(ids[:, i: i + L])
        return torch.hstack(out)

    # --- scoring ---------------------------------------------------------------------------
    def evaluate_model(self, model, tok, out_dir=None) -> dict:
        import torch
        windows = self.windows(tok)
        device = next(model.parameters()).device
        n, L = windows.shape
        nll_sum = 0.0
        with torch.no_grad():
            for start in range(0, n, self.cfg.batch_size):
                batch = windows[start: start + self.cfg.batch_size].to(device)
                logits = model(batch).logits.float()
                loss = torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none")
                # GPTQ llama_eval: mean over the window's L-1 predictions, times L
                nll_sum += float(loss.view(batch.shape[0], L - 1).mean(1).sum()) * L
        return {"ppl": math.exp(nll_sum / (n * L)), "n_windows": int(n), "seqlen": int(L)}


def _missing(p):
    raise UserError(f"task.data_files={str(p)!r}: no such file")
