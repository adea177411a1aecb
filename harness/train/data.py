"""Training data for the methods that train a model (Reasoning-QAT, QuantLRM's pseudo fine-tuning).

An *example* is a pair (ids, labels) of 1-D LongTensors; labels are -100 where no loss is taken
(prompts when `mask_prompts`, padding). Examples come from two kinds of source:

- documents: (prompt, response) pairs — e.g. the full-precision model's own greedy traces on training
  prompts (`trace_documents`) — one example per document, nothing packed;
- packed rows of token ids from the calibration machinery (`harness.calib`): chat documents joined by
  EOS and cut into rows. `examples_from_rows` takes the rows in order as one stream (the packing
  sources that hold chat documents — toy, reasoning, local — pack consecutively), splits it back into
  whole documents at each response's EOS and keeps every piece that has a response token: a trace
  longer than a row is rejoined, the one cut by the end of the data is kept up to the cut.

Rows longer than `seq_len` are cut into consecutive rows of `seq_len` tokens (`cut_rows`), never
dropped. What is dropped — pieces with no token to train on — is counted (`DataReport`) and printed.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

Example = tuple[torch.Tensor, torch.Tensor]


@dataclass
class DataReport:
    """What became of the training data: printed by the methods and stored in the result info."""
    how: str = ""
    documents: int = 0              # documents (or packed rows) found
    kept: int = 0                   # ... of which trained on
    dropped: int = 0                # ... dropped: nothing to train on (every label masked)
    dropped_tokens: int = 0         # tokens not trained on for want of a known start (a stream starting mid-document)
    cut: int = 0                    # documents cut by the end of the data (kept up to the cut)
    split: int = 0                  # documents longer than seq_len, cut into several rows (kept whole)
    rows: int = 0                   # training rows in the end
    loss_tokens: int = 0            # tokens with a label
    extra: dict = field(default_factory=dict)

    def admit(self, examples: list, x: torch.Tensor, y: torch.Tensor, *, cut: bool = False) -> None:
        """Count one document; keep it in `examples` when some label is left to train on."""
        self.documents += 1
        if bool((y[1:] != -100).any()):
            self.kept += 1
            self.cut += int(cut)
            examples.append((x, y))
        else:
            self.dropped += 1

    @property
    def kept_fraction(self) -> float:
        return self.kept / self.documents if self.documents else 0.0

    def line(self, what: str) -> str:
        s = (f"{what}: {self.how}: {self.kept}/{self.documents} documents kept ({self.kept_fraction:.1%}), "
             f"{self.rows} rows, {self.loss_tokens} loss tokens")
        if self.dropped or self.dropped_tokens:
            s += f"; dropped {self.dropped} documents with nothing to train on, {self.dropped_tokens} unattributable tokens"
        if self.split:
            s += f"; {self.split} documents longer than seq_len cut into rows"
        if self.cut:
            s += f"; {self.cut} cut by the end of the data (kept up to the cut)"
        return s

    def as_dict(self) -> dict:
        return {"how": self.how, "documents": self.documents, "kept": self.kept, "dropped": self.dropped,
                "dropped_tokens": self.dropped_tokens, "cut": self.cut, "split": self.split, "rows": self.rows,
                "loss_tokens": self.loss_tokens, **self.extra}


# ------------------------------------------------------------------ chat structure

def generation_marker(tokenizer) -> Optional[list[int]]:
    """Token ids the chat template puts before an assistant response ("<|im_start|>assistant\\n"), or None."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return None
    msgs = [{"role": "user", "content": "x"}]
    try:
        with_gen = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        without = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
    except Exception:
        return None
    if not with_gen.startswith(without) or len(with_gen) == len(without):
        return None
    return tokenizer.encode(with_gen[len(without):], add_special_tokens=False) or None


def response_spans(row: torch.Tensor, marker: list[int], eos_id: Optional[int]) -> list[tuple[int, int, bool]]:
    """(start, stop, closed) of each response in a packed row of chat documents: from after a generation
    marker through the next EOS (closed) or the row's end (not closed)."""
    L = len(marker)
    if row.numel() < L:
        return []
    hits = (row.unfold(0, L, 1) == torch.tensor(marker, dtype=row.dtype)).all(-1).nonzero()[:, 0].tolist()
    spans = []
    for h in hits:
        a = h + L
        ends = (row[a:] == eos_id).nonzero() if eos_id is not None else torch.empty(0, 1)
        spans.append((a, a + int(ends[0, 0]) + 1, True) if len(ends) else (a, row.numel(), False))
    return spans


def response_labels(ids: torch.Tensor, marker: Optional[list[int]], eos_id: Optional[int]) -> torch.Tensor:
    """Labels for packed chat documents: a token is trained on only if it is known to be response —
    after a generation marker, up to and including the next EOS (or the row's end). Prompts, and the
    unattributable tokens before a row's first marker, get -100. No marker: every token is a label."""
    if not marker:
        return ids.clone()
    labels = torch.full_like(ids, -100)
    for r in range(ids.shape[0]):
        for a, b, _ in response_spans(ids[r], marker, eos_id):
            labels[r, a:b] = ids[r, a:b]
    return labels


# ------------------------------------------------------------------ packed rows -> documents

def prompt_prefix(tokenizer) -> Optional[list[int]]:
    """Token ids a rendered chat prompt starts with (before the user's text), or None."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return None
    sentinel = "\u2063q\u2063"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": sentinel}], tokenize=False,
                                             add_generation_prompt=True)
    except Exception:
        return None
    head = text.split(sentinel)[0]
    return tokenizer.encode(head, add_special_tokens=False) or None if head else None


def _first_document_start(head: torch.Tensor, prefix: Optional[list[int]]) -> int:
    """Where the stream's first whole document starts in `head` (the tokens before its first generation
    marker): the last occurrence of the prompt prefix; 0 when it cannot be told (nothing is dropped)."""
    if not prefix or head.numel() < len(prefix):
        return 0
    hits = (head.unfold(0, len(prefix), 1) == torch.tensor(prefix, dtype=head.dtype)).all(-1).nonzero()
    return int(hits[-1, 0]) if len(hits) else 0


def split_documents(ids: torch.Tensor, marker: list[int], eos_id: Optional[int], mask_prompts: bool = True,
                    report: Optional[DataReport] = None, prefix: Optional[list[int]] = None) -> list[Example]:
    """Whole (prompt + response) documents out of packed chat rows taken in order as one stream.

    A document runs from just after one response's EOS through the next response's EOS; the one the
    end of the data cuts is kept up to the cut. Tokens before the stream's first document (it starts
    inside an earlier document; the first document starts at the last `prefix` — the chat prompt's
    first tokens, `prompt_prefix` — before the first marker) have no known prompt/response boundary and
    are counted as dropped, as is a piece with no response token.
    """
    report = report if report is not None else DataReport()
    stream = ids.reshape(-1)
    spans = response_spans(stream, marker, eos_id)
    if not spans:
        report.dropped_tokens += stream.numel()
        return []
    start = _first_document_start(stream[:spans[0][0] - len(marker)], prefix)
    report.dropped_tokens += start
    docs = []
    for a, b, closed in spans:
        if a - len(marker) < start:         # a marker inside the previous response: not a new document
            continue
        x = stream[start:b].clone()
        y = x.clone()
        if mask_prompts:
            y[: a - start] = -100
        report.admit(docs, x, y, cut=not closed)
        start = b
    return docs


def cut_rows(examples: list[Example], seq_len: Optional[int], report: Optional[DataReport] = None) -> list[Example]:
    """Examples longer than seq_len cut into consecutive rows of at most seq_len tokens (none dropped;
    a row with no label left in it carries no loss and is left out). seq_len None: as they are."""
    if not seq_len:
        return list(examples)
    out = []
    for x, y in examples:
        if x.numel() <= seq_len:
            out.append((x, y))
            continue
        if report is not None:
            report.split += 1
        for a in range(0, x.numel(), seq_len):
            xs, ys = x[a:a + seq_len], y[a:a + seq_len]
            if bool((ys[1:] != -100).any()):
                out.append((xs, ys))
    return out


def examples_from_rows(ids: torch.Tensor, tokenizer, *, packing: bool = False, mask_prompts: bool = True,
                       seq_len: Optional[int] = None) -> tuple[list[Example], DataReport]:
    """Training examples from packed token rows [n, L] (harness.calib), and what became of them.

    Chat-formatted data (the tokenizer's generation marker is found): one whole document per example
    (`packing=false`, the usual SFT) or the packed rows, loss on responses only when `mask_prompts`.
    Plain texts: the packed rows, loss on every token.
    """
    marker = generation_marker(tokenizer)
    eos = getattr(tokenizer, "eos_token_id", None)
    report = DataReport()
    chat = bool(marker) and bool((response_labels(ids, marker, eos) != -100).any())
    if chat and not packing:
        report.how = "documents" + (", responses only" if mask_prompts else "")
        examples = split_documents(ids, marker, eos, mask_prompts, report, prompt_prefix(tokenizer))
    else:
        labels = response_labels(ids, marker, eos) if chat and mask_prompts else ids.clone()
        report.how = "packed rows" + (", responses only" if chat and mask_prompts else "")
        examples = []
        for x, y in zip(ids, labels):
            report.admit(examples, x, y)
    return finish(examples, report, seq_len)


def finish(examples: list[Example], report: DataReport, seq_len: Optional[int] = None) -> tuple[list[Example], DataReport]:
    examples = cut_rows(examples, seq_len, report)
    report.rows = len(examples)
    report.loss_tokens = int(sum(int((y[1:] != -100).sum()) for _, y in examples))
    return examples, report


# ------------------------------------------------------------------ documents from the model's own traces

def trace_documents(prompts: list[str], tokenizer, generate: Optional[Callable], *, cache_dir=None,
                    model_key: Optional[str] = None, max_new_tokens: int = 1024, mask_prompts: bool = True,
                    what: str = "training traces") -> tuple[list[Example], DataReport]:
    """One (prompt + greedy trace + EOS) document per *rendered* prompt, loss on the trace when
    `mask_prompts`. Traces come from `generate(prompts, max_new_tokens=...)` (the full-precision model)
    and are cached with calib=reasoning's trace cache (keyed by the model, the length, the template)."""
    from harness.calib import CalibConfig, TraceCache, trace_cache_key
    from harness.types import UserError
    cfg = CalibConfig(name="reasoning", max_new_tokens=max_new_tokens)
    root = Path(cache_dir).expanduser() if cache_dir else Path.home() / ".cache" / "rqbench"
    cache = TraceCache(root / "calib" / "traces" / f"{trace_cache_key(cfg, tokenizer, model_key)}.jsonl")
    missing = [p for p in dict.fromkeys(prompts) if p not in cache.traces]
    if missing:
        if generate is None:
            raise UserError(f"{what}: traces are generated by the full-precision model, but no generator was given")
        outs = list(generate(missing, max_new_tokens=max_new_tokens))
        if len(outs) != len(missing):
            raise RuntimeError(f"generate returned {len(outs)} completions for {len(missing)} prompts")
        cache.add(list(zip(missing, outs)))
    eos = [tokenizer.eos_token_id] if isinstance(getattr(tokenizer, "eos_token_id", None), int) else []
    report = DataReport(how="the model's own greedy traces" + (", responses only" if mask_prompts else ""))
    examples = []
    for p in prompts:
        p_ids = tokenizer.encode(p, add_special_tokens=False)
        r_ids = tokenizer.encode(cache.traces[p], add_special_tokens=False)
        if len(r_ids) >= max_new_tokens:        # stopped by the length cap: no EOS taught
            report.cut += 1
        else:
            r_ids = r_ids + eos
        x = torch.tensor(p_ids + r_ids, dtype=torch.long)
        y = x.clone()
        if mask_prompts:
            y[:len(p_ids)] = -100
        report.admit(examples, x, y)
    return examples, report


# ------------------------------------------------------------------ batches

def collate(batch: list[Example], pad_id: int, device, seq_len: Optional[int] = None):
    """Right-padded ids, attention mask and labels (-100 on padding), rows cut to seq_len if given."""
    if seq_len:
        batch = [(x[:seq_len], y[:seq_len]) for x, y in batch]
    width = max(x.numel() for x, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (x, y) in enumerate(batch):
        ids[i, :x.numel()], labels[i, :y.numel()], mask[i, :x.numel()] = x, y, 1
    return ids.to(device), mask.to(device), labels.to(device)


def pad_id_of(tokenizer) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    return pad if pad is not None else (getattr(tokenizer, "eos_token_id", None) or 0)


def holdout(examples: list[Example], n_val: int, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, validation): n_val examples drawn out at random (seeded), the rest kept in order."""
    if n_val <= 0:
        return list(examples), []
    idx = list(range(len(examples)))
    random.Random(f"holdout-{seed}").shuffle(idx)
    val = set(idx[:n_val])
    return [e for i, e in enumerate(examples) if i not in val], [examples[i] for i in sorted(val)]


__all__ = ["Example", "DataReport", "generation_marker", "prompt_prefix", "response_spans", "response_labels", "split_documents",
           "cut_rows", "examples_from_rows", "trace_documents", "collate", "pad_id_of", "holdout", "finish"]
