"""Greedy accuracy of a toy checkpoint on held-out arith problems (the feasibility check of the zoo)."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from harness.backends.hf import HFBackend, HFBackendConfig
from harness.types import Sampling
from tasks.arith import ArithConfig, ArithTask


def greedy_accuracy(path: Path, n: int = 500) -> float:
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    task = ArithTask(ArithConfig(name="arith", n_problems=n))
    exs = task.examples()
    prompts = [tok.apply_chat_template(task.prompt(ex), tokenize=False, add_generation_prompt=True) for ex in exs]
    backend = HFBackend(HFBackendConfig(batch_size=100), model, tok, torch.device("cpu"), progress=False)
    outs = backend.generate(prompts, Sampling(n=1, temperature=0.0, max_new_tokens=128))
    return sum(task.score(ex, o[0].text, o[0].finish_reason).correct for ex, o in zip(exs, outs)) / len(exs)
