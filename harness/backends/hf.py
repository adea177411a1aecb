"""transformers generation: batched by prompt length, left-padded, KV cache, per-sample seeds.

A hand-written decode loop rather than `model.generate`, for two reasons: every (prompt, sample)
row samples from its own seeded noise (so results do not depend on batch composition or on a
resume), and the loop does no per-row Python work — one forward and a few tensor ops per step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from harness.registry import register_backend
from harness.seeding import gumbel_noise
from harness.types import Completion, Sampling, UserError


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
        self.stop_ids = torch.tensor(stop_token_ids(tokenizer, model), device=device)
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else int(self.stop_ids[0])

    def generate(self, prompts: list[str], sampling: Sampling,
                 seeds: list[list[int]] | None = None) -> list[list[Completion]]:
        """All samples of all prompts; seeds[i][j] seeds sample j of prompt i."""
        if seeds is None:
            seeds = [[sampling.seed * 1_000_003 + i * 1009 + j for j in range(sampling.n)] for i in range(len(prompts))]
        encoded = [self.tok.encode(p, add_special_tokens=False) for p in prompts]
        # len(seeds[i]) samples of prompt i: fewer than n when a resume or a chunk boundary split its samples.
        rows = [(i, j) for i in range(len(prompts)) for j in range(len(seeds[i]))]
        rows.sort(key=lambda r: len(encoded[r[0]]))      # similar lengths together: less padding
        out: list[list[Completion | None]] = [[None] * len(s) for s in seeds]
        bs = self.cfg.batch_size
        bar = tqdm(total=len(rows), desc="generate", unit="sample", disable=not self.progress)
        for start in range(0, len(rows), bs):
            chunk = rows[start:start + bs]
            done = self._decode([encoded[i] for i, _ in chunk], [seeds[i][j] for i, j in chunk], sampling)
            for (i, j), c in zip(chunk, done):
                out[i][j] = c
            bar.update(len(chunk))
        bar.close()
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def _decode(self, batch: list[list[int]], seeds: list[int], sp: Sampling) -> list[Completion]:
        dev, B = self.device, len(batch)
        width = max(map(len, batch))
        ids = torch.full((B, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((B, width), dtype=torch.long)
        for r, toks in enumerate(batch):
            ids[r, width - len(toks):] = torch.tensor(toks)
            mask[r, width - len(toks):] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        seed_t = torch.tensor(seeds, dtype=torch.int64, device=dev)
        cache = DynamicCache()
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                            past_key_values=cache, use_cache=True).logits[:, -1, :]
        generated = torch.full((B, sp.max_new_tokens), self.pad_id, dtype=torch.long, device=dev)
        lengths = torch.zeros(B, dtype=torch.long, device=dev)
        finished = torch.zeros(B, dtype=torch.bool, device=dev)
        next_pos = pos[:, -1] + 1
        for step in range(sp.max_new_tokens):
            logits = logits.float()
            if sp.temperature > 0:
                scores = _filter_logits(logits / sp.temperature, sp.top_k, sp.top_p)
                token = (scores + gumbel_noise(seed_t, step, scores.shape[-1])).argmax(-1)
            else:
                token = logits.argmax(-1)
            token = torch.where(finished, torch.full_like(token, self.pad_id), token)
            generated[:, step] = token
            is_stop = torch.isin(token, self.stop_ids) & ~finished
            lengths += (~finished).long()
            finished |= is_stop
            if bool(finished.all()):
                break
            mask = torch.cat([mask, mask.new_ones((B, 1))], dim=1)
            logits = self.model(input_ids=token[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                                past_key_values=cache, use_cache=True).logits[:, -1, :]
            next_pos = next_pos + 1
        return self._completions(generated.cpu(), lengths.cpu(), finished.cpu())

    def _completions(self, generated, lengths, finished) -> list[Completion]:
        out = []
        for r in range(generated.shape[0]):
            n = int(lengths[r])
            toks = generated[r, :n].tolist()
            stopped = bool(finished[r])
            text_toks = toks[:-1] if stopped else toks      # the stop token is not part of the text
            out.append(Completion(text=self.tok.decode(text_toks, skip_special_tokens=False),
                                  n_tokens=n, finish_reason="stop" if stopped else "length"))
        return out
