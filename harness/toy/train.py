"""Deterministic CPU training of the toy reasoning models.

`toy-base` learns the answer format without a chain of thought (it mostly guesses); `toy` is
fine-tuned from `toy-base` to reason step by step. The pair is a real (base, fine-tuned) couple
for QuantLRM's weight-update signal.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import Qwen3Config, Qwen3ForCausalLM

from harness.toy import arith


@dataclass
class TrainRecipe:
    steps: int
    batch_size: int = 64
    lr: float = 3e-3
    warmup: int = 50
    with_reasoning: bool = True
    seed: int = 0
    threads: int = 2        # part of the recipe: bit-for-bit reproduction needs the same thread count


BASE_RECIPE = TrainRecipe(steps=200, batch_size=48, with_reasoning=False, seed=1)
# Fine-tuning runs in stages: a high-lr stage, then low-lr polishing with bigger batches.
FINETUNE_RECIPES = (TrainRecipe(steps=1400, batch_size=48, lr=3e-3, with_reasoning=True, seed=2),
                    TrainRecipe(steps=1000, batch_size=64, lr=1e-3, warmup=20, with_reasoning=True, seed=3,
                                threads=1),
                    TrainRecipe(steps=800, batch_size=64, lr=5e-4, warmup=20, with_reasoning=True, seed=4,
                                threads=1))


def toy_config(vocab_size: int) -> Qwen3Config:
    # Every linear's input width (128 hidden, 4x32 attention, 384 MLP) is a multiple of 128,
    # so group sizes 32, 64 and 128 all apply.
    return Qwen3Config(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=1024,
        rope_theta=10000.0, tie_word_embeddings=True, torch_dtype="float32",
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )


def encode_example(tok, p: arith.ArithProblem, with_reasoning: bool) -> tuple[list[int], list[int]]:
    """Token ids of prompt+response and the loss mask (1 on response tokens only)."""
    prompt = tok.apply_chat_template([{"role": "user", "content": p.question()}],
                                     tokenize=False, add_generation_prompt=True)
    response = p.response(with_reasoning) + tok.eos_token
    p_ids = tok.encode(prompt, add_special_tokens=False)
    r_ids = tok.encode(response, add_special_tokens=False)
    return p_ids + r_ids, [0] * len(p_ids) + [1] * len(r_ids)


def _batch(tok, problems, with_reasoning):
    enc = [encode_example(tok, p, with_reasoning) for p in problems]
    width = max(len(ids) for ids, _ in enc)
    ids = torch.full((len(enc), width), tok.pad_token_id, dtype=torch.long)
    labels = torch.full((len(enc), width), -100, dtype=torch.long)
    attn = torch.zeros((len(enc), width), dtype=torch.long)
    for i, (x, m) in enumerate(enc):
        ids[i, :len(x)] = torch.tensor(x)
        attn[i, :len(x)] = 1
        labels[i, :len(x)] = torch.where(torch.tensor(m) == 1, torch.tensor(x), torch.tensor(-100))
    return ids, attn, labels


def train(model: Qwen3ForCausalLM, tok, recipe: TrainRecipe, desc: str = "train") -> list[float]:
    """Train in place; returns the loss curve. Same recipe + same start weights -> same result."""
    torch.manual_seed(recipe.seed)
    torch.set_num_threads(recipe.threads)
    rng = random.Random(recipe.seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.01, betas=(0.9, 0.98))

    def lr_at(step):
        if step < recipe.warmup:
            return (step + 1) / recipe.warmup
        progress = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
        return 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    losses = []
    bar = tqdm(range(recipe.steps), desc=desc, unit="step")
    for _ in bar:
        batch = [arith.sample_problem(rng) for _ in range(recipe.batch_size * 2)]
        batch = [p for p in batch if not arith.is_held_out(p)][: recipe.batch_size]
        ids, attn, labels = _batch(tok, batch, recipe.with_reasoning)
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses


def new_model(tok, seed: int = 0) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    cfg = toy_config(len(tok))
    cfg.pad_token_id = tok.pad_token_id
    cfg.eos_token_id = tok.eos_token_id
    return Qwen3ForCausalLM(cfg).float()
