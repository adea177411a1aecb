"""The optimiser loop shared by the methods that train (Reasoning-QAT's QAT, QuantLRM's pseudo fine-tuning).

`train(...)` runs `steps` optimizer steps over examples in seeded epochs (`batch_order`), each step
`grad_accum` micro-batches of `batch_size` examples; learning rate: linear warm-up, then cosine (or
linear, or constant) decay; gradients clipped to `max_grad_norm`. Every `eval_every` steps (and at the
end) the loss on held-out validation examples is measured; with `keep_best` the trainable parameters
at the lowest validation loss are what the model holds at the end.

Resumable: with a `StateFile`, the trainable parameters, optimizer, scheduler, logs and best state are
saved every `save_every` steps (and at the end); a rerun with the same key continues from there and
ends with the same weights as an uninterrupted run (the batch order is a pure function of the seed).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from harness.quant.state import StateFile
from harness.train.data import Example, collate

DECAYS = ("cosine", "linear", "constant")


@dataclass
class LoopConfig:
    steps: int
    batch_size: int = 8
    grad_accum: int = 1
    warmup: int = 0
    decay: str = "cosine"
    max_grad_norm: float = 1.0        # 0: no clipping
    seq_len: Optional[int] = None     # rows cut to this many tokens at collation (null: as they are)
    eval_every: int = 0               # 0: validation only at the end (if there is validation data)
    keep_best: bool = True
    save_every: int = 50
    seed: int = 0


@dataclass
class TrainLog:
    losses: list = field(default_factory=list)           # training loss per step
    val: list = field(default_factory=list)              # [step, validation loss]
    best_step: Optional[int] = None                      # step whose parameters the model holds (keep_best)
    resumed_at: int = 0

    def as_dict(self) -> dict:
        return {"losses": self.losses, "val": self.val, "best_step": self.best_step, "resumed_at": self.resumed_at}


def lr_lambda(warmup: int, steps: int, decay: str = "cosine") -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        t = (step - warmup) / max(1, steps - warmup)
        if decay == "cosine":
            return 0.5 * (1 + math.cos(math.pi * t))
        if decay == "linear":
            return max(0.0, 1 - t)
        return 1.0
    return f


def batch_order(n_examples: int, n_rows: int, seed: int) -> list[int]:
    """Example indices for n_rows rows: concatenated seeded permutations (epochs). A pure function of
    its arguments, so a resumed run draws exactly the batches the interrupted one would have."""
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < n_rows:
        order += torch.randperm(n_examples, generator=gen).tolist()
    return order[:n_rows]


def steps_for(epochs: float, n_examples: int, rows_per_step: int) -> int:
    """Optimizer steps that make `epochs` passes over n_examples (at least one step)."""
    return max(1, math.ceil(epochs * n_examples / rows_per_step))


def trainable(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _params_cpu(params: dict) -> dict:
    return {n: p.detach().cpu().clone() for n, p in params.items()}


@torch.no_grad()
def _load_params(params: dict, saved: dict) -> None:
    if set(params) != set(saved):
        raise RuntimeError("saved training state does not match the model's trainable parameters")
    for n, p in params.items():
        p.copy_(saved[n].to(p.device))


def snapshot(model, opt, sched, step: int, **extra) -> dict:
    return {"step": step, "params": _params_cpu(trainable(model)), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict() if sched is not None else None, **extra}


def resume(state_file: StateFile, model, opt, sched) -> Optional[dict]:
    """The saved state (model parameters, optimizer and scheduler restored from it), or None."""
    saved = state_file.load()
    if saved is None:
        return None
    _load_params(trainable(model), saved["params"])
    opt.load_state_dict(saved["optimizer"])
    if sched is not None and saved.get("scheduler") is not None:
        sched.load_state_dict(saved["scheduler"])
    return saved


@torch.no_grad()
def evaluate(model, loss_fn, examples: list[Example], *, batch_size: int, pad_id: int, device,
             seq_len: Optional[int] = None) -> float:
    """Mean loss over examples, weighted by their label tokens (the model in eval mode)."""
    was = model.training
    model.eval()
    tot, n = 0.0, 0
    for a in range(0, len(examples), batch_size):
        ids, mask, labels = collate(examples[a:a + batch_size], pad_id, device, seq_len)
        k = int((labels[:, 1:] != -100).sum())
        if k:
            tot += float(loss_fn(model, ids, mask, labels)) * k
            n += k
    model.train(was)
    return tot / max(n, 1)


def train(model, opt: torch.optim.Optimizer, loss_fn, examples: list[Example], cfg: LoopConfig, *, pad_id: int,
          val_examples: Optional[list[Example]] = None, state_file: Optional[StateFile] = None,
          progress: bool = True, desc: str = "train", stop_at: Optional[int] = None,
          gradient_checkpointing: bool = False) -> TrainLog:
    """Train `model`'s trainable parameters (those in `opt`) on `examples` with `loss_fn(model, ids, mask,
    labels) -> scalar`. `stop_at`: leave after that many steps, the state saved, as a preempted job would."""
    state_file = state_file or StateFile(None, {})
    params = trainable(model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.warmup, cfg.steps, cfg.decay))
    log = TrainLog()
    best: Optional[dict] = None
    best_loss = math.inf
    saved = resume(state_file, model, opt, sched)
    if saved is not None:
        log = TrainLog(list(saved["losses"]), [list(v) for v in saved["val"]], saved["best_step"], saved["step"])
        best, best_loss = saved["best"], saved["best_loss"]
    start = log.resumed_at
    rows_per_step = cfg.batch_size * cfg.grad_accum
    order = batch_order(len(examples), cfg.steps * rows_per_step, cfg.seed)
    device = next(iter(params.values())).device if params else torch.device("cpu")
    val_examples = val_examples or []

    def validate(step: int) -> None:
        nonlocal best, best_loss
        v = evaluate(model, loss_fn, val_examples, batch_size=rows_per_step, pad_id=pad_id, device=device,
                     seq_len=cfg.seq_len)
        log.val.append([step, v])
        if v < best_loss:
            best_loss, log.best_step = v, step
            best = _params_cpu(params) if cfg.keep_best else None

    def save(step: int) -> None:
        state_file.save(snapshot(model, opt, sched, step, losses=log.losses, val=log.val, best_step=log.best_step,
                                 best=best, best_loss=best_loss))

    gc_was = bool(getattr(model, "is_gradient_checkpointing", False))
    if gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if val_examples and start == 0 and not log.val:
        validate(0)                    # the starting point competes too: training must beat it to be kept
    model.train()
    bar = tqdm(range(start, cfg.steps), desc=desc, unit="step", disable=not progress, initial=start,
               total=cfg.steps)
    try:
        with torch.enable_grad():
            for step in bar:
                if stop_at is not None and step >= stop_at:
                    break
                opt.zero_grad(set_to_none=True)
                total = 0.0
                rows = order[step * rows_per_step:(step + 1) * rows_per_step]
                for a in range(cfg.grad_accum):
                    ids, mask, labels = collate([examples[i] for i in rows[a * cfg.batch_size:(a + 1) * cfg.batch_size]],
                                                pad_id, device, cfg.seq_len)
                    loss = loss_fn(model, ids, mask, labels)
                    if not torch.isfinite(loss):
                        raise RuntimeError(f"{desc}: the training loss is not finite (lower the learning rate?)")
                    (loss / cfg.grad_accum).backward()
                    total += float(loss.detach()) / cfg.grad_accum
                if cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
                opt.step()
                sched.step()
                log.losses.append(total)
                done = step + 1
                if val_examples and ((cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps):
                    validate(done)
                    model.train()
                bar.set_postfix(loss=f"{total:.4f}", **({"val": f"{log.val[-1][1]:.4f}"} if log.val else {}))
                if done % cfg.save_every == 0 or done == cfg.steps or (stop_at is not None and done >= stop_at):
                    save(done)
    finally:
        model.eval()
        if gradient_checkpointing and not gc_was and hasattr(model, "gradient_checkpointing_disable"):
            model.gradient_checkpointing_disable()
        opt.zero_grad(set_to_none=True)
    if len(log.losses) == cfg.steps and cfg.keep_best and best is not None:
        _load_params(params, best)
    return log


__all__ = ["LoopConfig", "TrainLog", "DECAYS", "lr_lambda", "batch_order", "steps_for", "trainable", "snapshot",
           "resume", "evaluate", "train"]
