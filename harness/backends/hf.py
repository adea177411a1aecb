"""transformers generation with continuous batching, per-sample seeds, and every sample streamed as it ends.

A hand-written decode loop rather than `model.generate`:
- continuous batching: `batch_size` rows decode together; a row that stops leaves the batch at
  once and the next prompt is prefilled into its place, while the other rows keep their caches
  (see harness/backends/slots.py for the cache layout). Reasoning traces are long-tailed, so a
  static batch would spend most of its steps on rows that have already finished;
- each (prompt, sample) row samples from its own seeded noise, a function of (sample seed, the
  row's own step, token id): results do not depend on batch composition, order or a resume;
- `on_sample(i, j, completion)` is called the moment a row finishes, so the caller can store it
  (a kill loses only the rows in flight);
- the model builds its own cache (the first prefill is run without one), so hybrid models
  (linear-attention layers with conv and recurrent state) work as with `model.generate`.
"""
from __future__ import annotations

import inspect
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from harness.backends import slots
from harness.quant import actquant
from harness.registry import register_backend
from harness.seeding import gumbel_noise
from harness.types import Completion, Sampling, UserError

OnSample = Callable[[int, int, Completion], None]
GQA_SDPA = "rqbench_sdpa_gqa"


def _sdpa_gqa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' "sdpa" attention, with grouped-query heads handed to SDPA (`enable_gqa`) instead of copied.

    With a padding mask transformers repeats every key/value head `n_rep` times before SDPA (on CUDA the
    GQA path with a mask falls back to the math kernel). On CPU that copy of the whole cache at every step
    costs more than the attention itself, and SDPA's GQA path gives the same numbers."""
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
        is_causal=query.shape[2] > 1 and attention_mask is None and is_causal, enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(GQA_SDPA, _sdpa_gqa)
AttentionMaskInterface.register(GQA_SDPA, sdpa_mask)


@contextmanager
def _cpu_gqa_attention(model, device: torch.device):
    """On CPU, run a model that uses plain "sdpa" attention with `_sdpa_gqa` for the duration of a generate call
    (behind the q/k/v fake-quant wrapper of a W4A4 model when it has one: harness.quant.actquant)."""
    impl = getattr(model.config, "_attn_implementation", None)
    target = actquant.swap_inner(impl, "sdpa", GQA_SDPA) if device.type == "cpu" else None
    switch = target is not None
    if switch:
        try:
            model.set_attn_implementation(target)
        except Exception:               # a model that cannot switch keeps its own attention
            switch = False
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(impl)


@dataclass
class HFBackendConfig:
    name: str = "hf"
    batch_size: int = 64


def _filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the mass before it already reaches top_p (the first token always stays).
        drop = (probs.cumsum(-1) - probs) >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, idx, drop), float("-inf"))
    return logits


def stop_token_ids(tokenizer, model) -> list[int]:
    ids = set()
    for tid in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(tid, int):
            ids.add(tid)
        elif tid:
            ids.update(tid)
    for tok in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid is not None:
            ids.add(tid)
    return sorted(ids)


@register_backend("hf")
class HFBackend:
    Config = HFBackendConfig

    def __init__(self, cfg: HFBackendConfig, model, tokenizer, device: torch.device, progress: bool = True):
        if cfg.batch_size < 1:
            raise UserError(f"backend.batch_size={cfg.batch_size!r} is not allowed; allowed: a positive integer")
        self.cfg, self.model, self.tok, self.device, self.progress = cfg, model, tokenizer, device, progress
        self.stop_ids = frozenset(stop_token_ids(tokenizer, model))
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else min(self.stop_ids)
        # Prefill computes logits at the last position only (a 150k vocabulary x a long prompt is large).
        self._keep1 = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
        self.trace: list[tuple[float, int]] = []      # (seconds since start, active rows) per decode step

    def generate(self, prompts: list[str], sampling: Sampling, seeds: list[list[int]] | None = None,
                 on_sample: Optional[OnSample] = None) -> list[list[Completion]]:
        """All samples of all prompts; seeds[i][j] seeds sample j of prompt i.

        on_sample(i, j, completion) is called as soon as sample j of prompt i has finished."""
        if seeds is None:
            seeds = [[sampling.seed * 1_000_003 + i * 1009 + j for j in range(sampling.n)] for i in range(len(prompts))]
        encoded = [self.tok.encode(p, add_special_tokens=False) for p in prompts]
        out: list[list[Completion | None]] = [[None] * len(s) for s in seeds]
        bar = tqdm(total=sum(map(len, seeds)), desc="generate", unit="sample", disable=not self.progress)

        def emit(i: int, j: int, c: Completion) -> None:
            out[i][j] = c
            bar.update(1)
            if on_sample is not None:
                on_sample(i, j, c)

        # len(seeds[i]) samples of prompt i: fewer than n when a resume split its samples.
        rows = [_Row(i, j, seeds[i][j], self._budget(len(encoded[i]), sampling))
                for i in range(len(prompts)) for j in range(len(seeds[i]))]
        for r in rows:
            if r.budget <= 0:           # the prompt alone fills the context: nothing can be generated
                emit(r.i, r.j, Completion(text="", n_tokens=0, finish_reason="length"))
        with _cpu_gqa_attention(self.model, self.device):
            self._decode([r for r in rows if r.budget > 0], encoded, sampling, emit)
        bar.close()
        return out  # type: ignore[return-value]

    @staticmethod
    def _budget(prompt_len: int, sp: Sampling) -> int:
        cap = getattr(sp, "max_model_len", None)
        return sp.max_new_tokens if cap is None else min(sp.max_new_tokens, cap - prompt_len)

    def _forward(self, ids, mask, pos, cache, **kw):
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                         use_cache=True, **kw)
        return out.logits[:, -1, :], out.past_key_values

    def _prefill(self, rows: list["_Row"], encoded) -> "_Batch":
        """Newcomers in a cache of their own (the model builds it); the samples of one prompt share its prefill."""
        dev = self.device
        splice = self._splice is not False
        prompts = list(dict.fromkeys(r.i for r in rows)) if splice else [r.i for r in rows]
        width = max(len(encoded[i]) for i in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for k, i in enumerate(prompts):
            ids[k, width - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[k, width - len(encoded[i]):] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits, cache = self._forward(ids, mask, pos, None, **self._keep1)
        if self._splice is None:
            self._splice = slots.spliceable(cache)
            if not self._splice and len(prompts) != len(rows):     # rows cannot share a prefill after all
                return self._prefill(rows, encoded)
        if self._splice and len(prompts) != len(rows):
            where = torch.tensor([prompts.index(r.i) for r in rows], device=dev)
            slots.select_rows(cache, where)
            logits, mask, pos = logits[where], mask[where], pos[where]
        return _Batch(rows=list(rows), cache=cache, logits=logits, mask=mask, next_pos=pos[:, -1] + 1,
                      seed=torch.tensor([r.seed for r in rows], dtype=torch.int64, device=dev),
                      step=torch.zeros(len(rows), dtype=torch.int64, device=dev))

    @torch.inference_mode()
    def _decode(self, rows: list["_Row"], encoded, sp: Sampling, emit) -> None:
        self._splice: Optional[bool] = None       # known after the first prefill: can this cache be spliced?
        queue, size = deque(rows), self.cfg.batch_size
        batch: Optional[_Batch] = None
        t0, self.trace = time.perf_counter(), []
        while queue or batch is not None:
            if batch is None:
                batch = self._prefill([queue.popleft() for _ in range(min(size, len(queue)))], encoded)
            self.trace.append((time.perf_counter() - t0, batch.live))
            batch.token = self._sample(batch, sp)
            for r, t in zip(batch.rows, batch.token.tolist()):
                if not r.done:
                    r.tokens.append(t)
                    if t in self.stop_ids or len(r.tokens) >= r.budget:
                        r.done = True
                        emit(r.i, r.j, self._completion(r))
            batch.step += 1
            live = [k for k, r in enumerate(batch.rows) if not r.done]
            if self._splice:
                if not live and not queue:
                    break
                if self._compact_now(len(live), len(batch.rows), bool(queue)):
                    batch.select(live)
            elif not live:                          # a cache we cannot splice: whole batches only
                batch = None
                continue
            if batch.rows:
                batch.mask = torch.cat([batch.mask, batch.mask.new_ones((len(batch.rows), 1))], dim=1)
                batch.logits, batch.cache = self._forward(batch.token[:, None], batch.mask, batch.next_pos[:, None],
                                                          batch.cache)
                batch.next_pos = batch.next_pos + 1
            if self._splice and queue and len(batch.rows) < size:     # only right after a compaction
                newcomers = self._prefill([queue.popleft() for _ in range(min(size - len(batch.rows), len(queue)))],
                                          encoded)
                batch = batch.join(newcomers) if batch.rows else newcomers

    def _compact_now(self, live: int, rows: int, more_waiting: bool) -> bool:
        """Whether to drop the finished rows now (and, with prompts waiting, refill their slots).

        Every compaction copies the cache and every refill is one more forward (the prefill), so finished
        rows are let go in groups: an eighth of the batch while prompts wait (slots idle a few steps at most),
        half of the remaining rows in the tail (each step costs at most twice the live rows' share)."""
        dead = rows - live
        if more_waiting:
            return dead >= max(1, self.cfg.batch_size // 8) or live == 0
        return dead > 0 and 2 * live <= rows

    def _sample(self, batch: "_Batch", sp: Sampling) -> torch.Tensor:
        logits = batch.logits.float()
        if sp.temperature > 0:
            scores = _filter_logits(logits / sp.temperature, sp.top_k, sp.top_p)
            return (scores + gumbel_noise(batch.seed, batch.step, scores.shape[-1])).argmax(-1)
        return logits.argmax(-1)

    def _completion(self, r: "_Row") -> Completion:
        stopped = r.tokens[-1] in self.stop_ids
        text_toks = r.tokens[:-1] if stopped else r.tokens      # the stop token is not part of the text
        return Completion(text=self.tok.decode(text_toks, skip_special_tokens=False), n_tokens=len(r.tokens),
                          finish_reason="stop" if stopped else "length")


@dataclass(eq=False)
class _Row:
    i: int                  # prompt index
    j: int                  # sample index within seeds[i]
    seed: int
    budget: int             # tokens this row may generate (max_new_tokens, or what max_model_len leaves)
    done: bool = False

    def __post_init__(self):
        self.tokens: list[int] = []


@dataclass(eq=False)
class _Batch:
    """The active rows and their device state; row k of every tensor is rows[k]."""
    rows: list
    cache: object
    logits: torch.Tensor        # [rows, vocab]: the distribution of each row's next token
    mask: torch.Tensor          # [rows, width]: 1 on real tokens (rows right-aligned)
    next_pos: torch.Tensor      # [rows]: position id of each row's next token
    seed: torch.Tensor          # [rows]: sample seeds
    step: torch.Tensor          # [rows]: tokens generated so far (the noise counter)
    token: Optional[torch.Tensor] = None    # [rows]: the token each row sampled last (the next step's input)

    @property
    def live(self) -> int:
        return sum(not r.done for r in self.rows)

    def _take(self, idx: torch.Tensor) -> None:
        self.logits, self.mask, self.next_pos = self.logits[idx], self.mask[idx], self.next_pos[idx]
        self.seed, self.step, self.token = self.seed[idx], self.step[idx], self.token[idx]

    def select(self, keep: list[int]) -> None:
        """Keep only these rows; drop the leading columns that no remaining row uses."""
        idx = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        self.rows = [self.rows[k] for k in keep]
        slots.select_rows(self.cache, idx)
        self._take(idx)
        if keep:
            lead = int(self.mask.any(0).long().argmax())
            if lead * 4 >= self.mask.shape[1]:      # trimming copies the cache: only when it pays
                self._set_width(self.mask.shape[1] - lead)

    def _set_width(self, width: int) -> None:
        slots.set_width(self.cache, width)
        w = self.mask.shape[1]
        if width <= w:
            self.mask = self.mask[:, w - width:]
        else:
            self.mask = torch.cat([self.mask.new_zeros((self.mask.shape[0], width - w)), self.mask], dim=1)

    def join(self, new: "_Batch") -> "_Batch":
        width = max(self.mask.shape[1], new.mask.shape[1])
        self._set_width(width)
        new._set_width(width)
        slots.concat(self.cache, new.cache)
        self.rows += new.rows
        for name in ("logits", "mask", "next_pos", "seed", "step"):
            setattr(self, name, torch.cat([getattr(self, name), getattr(new, name)], dim=0))
        return self
