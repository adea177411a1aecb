"""Reasoning-QAT (arXiv 2601.14888): PTQ-initialised quantization-aware training with knowledge
distillation on reasoning traces, then (optionally) GRPO with a verifiable reward.

Only the paper's abstract is public; it gives four findings this method is built around: KD is a
robust objective, PTQ is a strong initialisation, RL helps once the model is a viable starting
point, and calibrating the PTQ on the QAT training domain helps. Everything below that is a choice
of ours, exposed in conf/method/reasoning_qat.yaml.

1. Teacher: a copy of the model *before* any quantization (`objective=kd` or RL with a KL term
   needs it; it doubles the model's memory — for big models precomputing teacher logits, or putting
   the teacher on another device, is the way out; not implemented here).
2. Data (harness.train.data): `method.data=task` (default) trains on the full-precision model's own
   greedy traces on `n_train` training prompts of the run's task (`method.task`, the run's task by
   default; its training split, never the evaluated one; traces cached), so the training domain is the
   task's and the set is distinct from the PTQ calibration rows; `n_val` more traces are held out for
   validation. `data=calib` trains on the run's calibration rows; a calib-style node
   (`method.data={name: local, path: texts.jsonl, ...}`) on something else: packed chat rows are split
   back into whole (prompt + response) documents, long ones kept (cut into rows of `seq_len` if set),
   what is dropped counted and printed; `n_val` of them held out. Loss on responses only (`mask_prompts`).
3. PTQ init: `method.init` names any quantizing method (gptq, rtn, awq, quantlrm, ...; `none` = the
   min/max grid of the fp weights). It quantizes the model in place as it would on its own; its
   codes/scales/zeros then seed FakeQuantLinear modules (harness.quant.fakequant): latent weight =
   the PTQ weight, grid = the PTQ grid, so step 0 of QAT is the PTQ model bit for bit.
4. QAT: every quantized linear trains its latent fp32 weight through the shared quantizer's STE
   (`fake_quantize_ste`), scales optionally learnable (`learn_scales`). Objective `kd`: forward KL
   KL(p_teacher || p_student) of the next-token distributions at temperature T (× T²), averaged over
   the response tokens; `sft`: cross-entropy on the same tokens. The shared loop (harness.train.loop):
   AdamW, `epochs` over the training documents (or `steps`), linear warmup, cosine decay, gradient
   accumulation and clipping; the validation loss (same objective) every `eval_every` steps, and the
   state with the lowest one kept (`keep_best`; step 0, the PTQ model, competes too).
5. RL (`rl.enabled`): GRPO from the QAT model with the quantizer in the loop — groups of samples are
   drawn from the fake-quant model (i.e. the deployed quantized model), rewarded 1/0 by the run's
   task's own scorer (`rl.task`, default `method.task`) on its training prompts (`rl.prompts=task`;
   never the evaluation split) or a local jsonl, at the task's generation length (`rl.max_new_tokens`
   null), advantages normalised within each group, PPO-clipped ratio objective, optional k3 KL to the
   RL start model (`kl_beta`). The mean reward per step is logged (result info, and printed).
6. Export: the final latent weights are rounded on the final grid into codes (QuantResult) that the
   shared exporter writes (fake or packed).

Preemption: training state (latent weights, scales, optimizer, scheduler, losses / rewards, step)
is saved every `save_every` steps under ${cache_dir}/reasoning_qat/train/<key>-{qat,rl}.pt, keyed by
the method config, the quant spec, the model's weights and the training data; a rerun of the same
job continues from the last saved step and ends with the same weights as an uninterrupted run.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from harness import registry
from harness.calib import as_calib_config, calibration_ids
from harness.quant import fakequant
from harness.quant.context import MethodConfig, QuantContext
from harness.quant.select import quantizable_linears
from harness.quant.state import StateFile, TrainingStopped
from harness.registry import register_method
from harness.train.data import (DataReport, collate, examples_from_rows, finish, holdout, pad_id_of,
                                trace_documents)
from harness.train.loop import LoopConfig, batch_order, resume, snapshot, steps_for, train, trainable
from harness.types import check_values, Example, QuantResult, Sampling, UserError

OBJECTIVES = ("kd", "sft")
LATENTS = ("projected", "ptq")
DATA_SOURCES = ("task", "calib")
RL_PROMPTS = ("task", "local")


@dataclass
class RLConfig:
    enabled: bool = False
    steps: int = 20
    prompts_per_step: int = 8
    group_size: int = 8               # samples per prompt (the GRPO group)
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: Optional[int] = None   # null: the task's own generation length (a reasoning model's)
    lr: float = 1.0e-5
    clip_eps: float = 0.2
    kl_beta: float = 0.0              # > 0: k3 KL to the model at the start of RL (a frozen copy)
    ppo_epochs: int = 1               # optimizer passes over each batch of samples
    micro_batch: int = 16             # sequences per forward/backward
    max_grad_norm: float = 1.0
    task: Optional[str] = None        # whose scorer gives the reward (and renders the prompts); null: method.task
    prompts: str = "task"             # task: the task's *training* prompts | local: jsonl (prompt_key, answer_key)
    path: Optional[str] = None
    prompt_key: str = "problem"
    answer_key: str = "answer"
    n_prompts: int = 1024             # size of the prompt pool
    n_val: int = 128                  # held-out prompts (not in the pool): greedy accuracy with the task's scorer
    eval_every: int = 5               # ... measured every this many steps (and at step 0, the RL start)
    keep_best: bool = True            # end with the state of the best validation accuracy (ties: the earliest)
    save_every: int = 5
    seed: int = 0


@dataclass
class ReasoningQATConfig(MethodConfig):
    init: str = "gptq"                # PTQ initialisation: any quantizing method, or none
    init_cfg: Optional[dict] = None   # overrides of the init method's config, e.g. {damp: 0.1}
    objective: str = "kd"             # kd | sft
    temperature: float = 1.0          # KD temperature
    learn_scales: bool = False
    latent: str = "projected"         # projected: the fp weight where it rounds to the PTQ code, else the PTQ weight | ptq: the PTQ weight
    task: Optional[str] = None        # the run's task (conf: ${task.name}): training prompts (data=task) and RL reward
    data: Any = "task"                # task: fp traces on the task's training prompts | calib: the run's calib rows | a calib-style node
    n_train: int = 2048               # data=task: training documents (prompts)
    n_val: int = 128                  # held-out validation documents (0: no validation, the last state is kept)
    max_new_tokens: Optional[int] = None   # data=task: trace length; null: the task's own
    mask_prompts: bool = True
    packing: bool = False
    seq_len: Optional[int] = None     # rows longer than this are cut into consecutive rows (null: as built)
    epochs: float = 1.0               # passes over the training documents ...
    steps: Optional[int] = None       # ... or exactly this many optimizer steps (null: from epochs)
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1.0e-4                # latent weights
    scale_lr: float = 1.0e-5          # learnable scales
    warmup: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_every: Optional[int] = None  # validation loss every this many steps; null: 10 times over the run
    keep_best: bool = True            # end with the state of the lowest validation loss (step 0 included)
    gradient_checkpointing: bool = False
    save_every: int = 50
    keep_checkpoints: bool = False    # keep the training state files after the method finished
    seed: int = 0
    rl: RLConfig = field(default_factory=RLConfig)


def check_config(cfg: ReasoningQATConfig) -> None:
    allowed_init = [m for m in registry.available("method") if m not in ("fp", "reasoning_qat")] + ["none"]
    checks = [("init", cfg.init in allowed_init, ", ".join(allowed_init)),
              ("objective", cfg.objective in OBJECTIVES, ", ".join(OBJECTIVES)),
              ("temperature", cfg.temperature > 0, "> 0"),
              ("latent", cfg.latent in LATENTS, ", ".join(LATENTS)),
              ("n_train", cfg.n_train >= 1, "an integer >= 1"), ("n_val", cfg.n_val >= 0, "an integer >= 0"),
              ("max_new_tokens", cfg.max_new_tokens is None or cfg.max_new_tokens >= 1, "null or an integer >= 1"),
              ("seq_len", cfg.seq_len is None or cfg.seq_len >= 2, "null or an integer >= 2"),
              ("epochs", cfg.epochs > 0, "> 0"),
              ("steps", cfg.steps is None or cfg.steps >= 0, "null (from epochs) or an integer >= 0"),
              ("batch_size", cfg.batch_size >= 1, "an integer >= 1"),
              ("grad_accum", cfg.grad_accum >= 1, "an integer >= 1"),
              ("lr", cfg.lr >= 0, ">= 0"), ("scale_lr", cfg.scale_lr >= 0, ">= 0"),
              ("warmup", cfg.warmup >= 0, "an integer >= 0"),
              ("weight_decay", cfg.weight_decay >= 0, ">= 0"),
              ("max_grad_norm", cfg.max_grad_norm >= 0, ">= 0 (0: no clipping)"),
              ("eval_every", cfg.eval_every is None or cfg.eval_every >= 1, "null or an integer >= 1"),
              ("save_every", cfg.save_every >= 1, "an integer >= 1")]
    r = cfg.rl
    checks += [("rl.steps", r.steps >= 0, "an integer >= 0"),
               ("rl.prompts_per_step", r.prompts_per_step >= 1, "an integer >= 1"),
               ("rl.group_size", r.group_size >= 2, "an integer >= 2 (advantages are relative to the group)"),
               ("rl.temperature", r.temperature > 0, "> 0 (GRPO samples)"),
               ("rl.top_p", 0 < r.top_p <= 1, "(0, 1]"),
               ("rl.max_new_tokens", r.max_new_tokens is None or r.max_new_tokens >= 1, "null or an integer >= 1"),
               ("rl.lr", r.lr >= 0, ">= 0"), ("rl.clip_eps", 0 < r.clip_eps < 1, "(0, 1)"),
               ("rl.kl_beta", r.kl_beta >= 0, ">= 0"), ("rl.ppo_epochs", r.ppo_epochs >= 1, "an integer >= 1"),
               ("rl.micro_batch", r.micro_batch >= 1, "an integer >= 1"),
               ("rl.max_grad_norm", r.max_grad_norm >= 0, ">= 0"),
               ("rl.prompts", r.prompts in RL_PROMPTS, ", ".join(RL_PROMPTS)),
               ("rl.n_prompts", r.n_prompts >= 1, "an integer >= 1"),
               ("rl.n_val", r.n_val >= 0, "an integer >= 0"), ("rl.eval_every", r.eval_every >= 1, "an integer >= 1"),
               ("rl.save_every", r.save_every >= 1, "an integer >= 1")]
    check_values("method", cfg, checks, get=_get)
    if cfg.init != "none":
        act = getattr(init_method(cfg), "act_spec", None)      # the init method's own checks (init_cfg applied)
        if act is not None:
            raise UserError(f"method.init_cfg.act_bits={act.bits} is not allowed: Reasoning-QAT trains weight-only "
                            f"fake-quant linears; allowed: null")
    if isinstance(cfg.data, str):
        if cfg.data not in DATA_SOURCES:
            raise UserError(f"method.data={cfg.data!r} is not allowed; allowed: {', '.join(DATA_SOURCES)}, "
                            f"or a calib-style node such as {{name: local, path: texts.jsonl}}")
    else:
        try:
            as_calib_config(cfg.data)
        except UserError as e:
            raise UserError(str(e).replace("calib.", "method.data.")) from None
    if cfg.data == "task":
        _task_with_train_split(cfg.task, "method.task", "method.data=task", "method.data=calib")
    if r.enabled:
        name = r.task or cfg.task
        key = "method.rl.task" if r.task else "method.task"
        if r.prompts == "task":
            _task_with_train_split(name, key, "method.rl.prompts=task", "method.rl.prompts=local method.rl.path=<prompts.jsonl>")
        elif name not in registry.available("task"):
            raise UserError(f"{key}={name!r} is not a known task (its scorer gives the RL reward); allowed: "
                            f"{', '.join(registry.available('task'))}")
        if r.prompts == "local" and not r.path:
            raise UserError("method.rl.prompts=local needs method.rl.path=<prompts.jsonl> (one JSON object per line "
                            f"with {r.prompt_key!r} and {r.answer_key!r} fields)")


def _task_with_train_split(name: Optional[str], key: str, what: str, instead: str) -> None:
    if name not in registry.available("task"):
        raise UserError(f"{key}={name!r} is not a known task; {what} needs the run's task (allowed: "
                        f"{', '.join(registry.available('task'))}), or use {instead}")
    if not hasattr(registry.get("task", name), "train_examples"):
        raise UserError(f"{key}={name}: this task has no training split to draw prompts from ({what}); "
                        f"use {instead}")


def make_task(name: str):
    cls = registry.get("task", name)
    return cls(cls.Config(name=name))


def init_method(cfg: "ReasoningQATConfig"):
    """The PTQ init method, constructed on its config with `init_cfg` applied (and this method's include/exclude)."""
    from harness.config import typed
    cls = registry.get("method", cfg.init)
    node = {**(cfg.init_cfg or {}), "name": cfg.init, "include": list(cfg.include), "exclude": list(cfg.exclude)}
    try:
        return cls(typed(cls.Config, node, "method.init_cfg"))
    except UserError as e:
        raise UserError(f"{e} (method.init={cfg.init}: its keys go in method.init_cfg)") from None


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


# ------------------------------------------------------------------ losses

def _shifted(logits: torch.Tensor, labels: torch.Tensor):
    """Logits at positions that predict a label (label != -100 at t+1), flattened."""
    mask = labels[:, 1:] != -100
    return logits[:, :-1][mask], labels[:, 1:][mask]


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
            temperature: float = 1.0) -> torch.Tensor:
    """Forward KL(p_teacher || p_student) at temperature T, × T², mean over the label positions."""
    s, _ = _shifted(student_logits.float(), labels)
    t, _ = _shifted(teacher_logits.float(), labels)
    log_ps = F.log_softmax(s / temperature, dim=-1)
    log_pt = F.log_softmax(t / temperature, dim=-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    return kl.mean() * temperature ** 2


def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    s, y = _shifted(logits.float(), labels)
    return F.cross_entropy(s, y)


def objective_fn(cfg: ReasoningQATConfig, teacher):
    """loss(model, ids, mask, labels) of the configured objective."""
    def loss(model, ids, mask, labels):
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        if cfg.objective == "sft":
            return sft_loss(logits, labels)
        with torch.no_grad():
            t_logits = teacher(input_ids=ids, attention_mask=mask, use_cache=False).logits
        return kd_loss(logits, t_logits, labels, cfg.temperature)
    return loss


def loop_config(cfg: ReasoningQATConfig, n_examples: int) -> LoopConfig:
    steps = cfg.steps if cfg.steps is not None else steps_for(cfg.epochs, n_examples, cfg.batch_size * cfg.grad_accum)
    return LoopConfig(steps=steps, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, warmup=cfg.warmup,
                      decay="cosine", max_grad_norm=cfg.max_grad_norm, seq_len=cfg.seq_len,
                      eval_every=cfg.eval_every or max(1, steps // 10), keep_best=cfg.keep_best,
                      save_every=cfg.save_every, seed=cfg.seed)


def train_qat(model, teacher, examples, cfg: ReasoningQATConfig, *, pad_id: int, state_file: StateFile,
              val_examples: Optional[list] = None, progress: bool = True, stop_at: Optional[int] = None) -> dict:
    """QAT of the fake-quant `model` on (ids, labels) examples (harness.train.loop). Returns the training
    log: {"losses", "val": [[step, loss]], "best_step", "resumed_at", "steps"}.

    `stop_at`: leave after that many steps (having saved the state), as a preempted job would.
    """
    params = trainable(model)
    weights = [p for n, p in params.items() if not n.endswith(".scale")]
    scales = [p for n, p in params.items() if n.endswith(".scale")]
    groups = [{"params": weights, "lr": cfg.lr}] + ([{"params": scales, "lr": cfg.scale_lr}] if scales else [])
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
    loop = loop_config(cfg, len(examples))
    log = train(model, opt, objective_fn(cfg, teacher), examples, loop, pad_id=pad_id, val_examples=val_examples,
                state_file=state_file, progress=progress, desc=f"reasoning_qat {cfg.objective}", stop_at=stop_at,
                gradient_checkpointing=cfg.gradient_checkpointing)
    return {**log.as_dict(), "steps": loop.steps}


# ------------------------------------------------------------------ GRPO

def rl_examples(rc: RLConfig, task, skip: int = 0) -> tuple[list[Example], list[Example]]:
    """(training prompts, held-out validation prompts) with verifiable answers (never the task's evaluation split).
    prompts=task: the task's training problems after the first `skip` (those QAT trained on)."""
    if rc.prompts == "task":
        exs = task.train_examples(skip + rc.n_prompts + rc.n_val, rc.seed)[skip:]
        return exs[:rc.n_prompts], exs[rc.n_prompts:]
    path = Path(rc.path).expanduser()
    if not path.is_file():
        raise UserError(f"method.rl.path={rc.path!r}: no such file")
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        rec = json.loads(line)
        if rc.prompt_key not in rec or rc.answer_key not in rec:
            raise UserError(f"{path}:{i}: needs {rc.prompt_key!r} and {rc.answer_key!r} fields")
        out.append(Example(id=f"rl-{len(out)}", question=rec[rc.prompt_key], gold=str(rec[rc.answer_key])))
    if not out:
        raise UserError(f"{path}: no records")
    n_val = min(rc.n_val, len(out) // 2)
    return out[:len(out) - n_val][:rc.n_prompts], out[len(out) - n_val:]


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """[n_prompts, group] rewards -> (r - group mean) / (group std + eps); 0 where a group agrees."""
    mean = rewards.mean(-1, keepdim=True)
    std = rewards.std(-1, unbiased=False, keepdim=True)
    return (rewards - mean) / (std + eps)


def _token_logps(model, ids, mask, resp_mask):
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
    logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
    return logp * resp_mask[:, 1:]


def grpo_loss(logp, old_logp, ref_logp, adv, resp_mask, clip_eps: float, kl_beta: float):
    """Per-sequence mean of -min(ρA, clip(ρ)A) (+ β k3-KL to the reference), summed over sequences.
    Caller divides by the number of sequences in the batch."""
    m = resp_mask[:, 1:].float()
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None]
    obj = torch.minimum(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)
    per_tok = -obj
    if kl_beta > 0 and ref_logp is not None:
        d = ref_logp - logp
        per_tok = per_tok + kl_beta * (torch.exp(d) - d - 1)
    per_seq = (per_tok * m).sum(-1) / m.sum(-1).clamp(min=1)
    return per_seq.sum()


def train_grpo(model, tok, task, cfg: ReasoningQATConfig, *, device, state_file: StateFile,
               progress: bool = True, stop_at: Optional[int] = None) -> dict:
    """GRPO on the fake-quant model. Returns {"rewards": [mean sampled reward per step], "val": [[step, greedy
    accuracy on the held-out prompts]], "best_step", "resumed_at"}; with `rl.keep_best` the model ends in the
    state of the best validation accuracy (the RL start included: RL never ends below it there)."""
    from harness.backends.hf import HFBackend, HFBackendConfig
    from harness.pipeline import render_prompt
    from harness.seeding import sample_seed
    rc = cfg.rl
    pool, val_pool = rl_examples(rc, task, skip=cfg.n_train + cfg.n_val if cfg.data == "task" else 0)
    params = trainable(model)
    opt = torch.optim.AdamW(list(params.values()), lr=rc.lr, weight_decay=0.0)
    saved = resume(state_file, model, opt, None)
    start, rewards_log = (saved["step"], list(saved["rewards"])) if saved is not None else (0, [])
    val_log = [list(v) for v in saved["val"]] if saved is not None else []
    best = saved["best"] if saved is not None else None
    best_step = saved["best_step"] if saved is not None else None
    resumed_at = start
    ref = None
    if rc.kl_beta > 0:
        ref = saved["ref"] if saved is not None and "ref" in saved else None
        ref_model = copy.deepcopy(model)
        if ref is not None:
            with torch.no_grad():
                for n, p in ref_model.named_parameters():
                    if n in ref:
                        p.copy_(ref[n])
        for p in ref_model.parameters():
            p.requires_grad_(False)
        ref_model.eval()
        ref = {n: p.detach().cpu().clone() for n, p in trainable(model).items()} if ref is None else ref
    else:
        ref_model = None
    backend = HFBackend(HFBackendConfig(batch_size=rc.prompts_per_step * rc.group_size), model, tok, device,
                        progress=False)
    eos = tok.eos_token_id
    pad = backend.pad_id
    enable_thinking = getattr(task.cfg, "enable_thinking", None)
    max_new = rc.max_new_tokens or task.cfg.sampling.max_new_tokens
    sampling = Sampling(n=rc.group_size, temperature=rc.temperature, top_p=rc.top_p, max_new_tokens=max_new,
                        seed=rc.seed)
    val_prompts = [render_prompt(tok, task.prompt(ex), enable_thinking) for ex in val_pool]

    def validate(step: int) -> None:
        nonlocal best, best_step
        if not val_pool:
            return
        model.eval()
        vb = HFBackend(HFBackendConfig(batch_size=max(1, min(len(val_pool), 128))), model, tok, device, progress=False)
        outs = vb.generate(val_prompts, Sampling(n=1, temperature=0.0, max_new_tokens=max_new, seed=rc.seed))
        acc = sum(task.score(ex, o[0].text, o[0].finish_reason).correct for ex, o in zip(val_pool, outs)) / len(val_pool)
        val_log.append([step, acc])
        earlier = [v for _, v in val_log[:-1]]
        if not earlier or acc > max(earlier):          # ties keep the earlier state
            best_step = step
            best = {n: p.detach().cpu().clone() for n, p in params.items()} if rc.keep_best else None

    if start == 0 and not val_log:
        validate(0)
    bar = tqdm(range(start, rc.steps), desc="reasoning_qat grpo", unit="step", disable=not progress,
               initial=start, total=rc.steps)
    for step in bar:
        if stop_at is not None and step >= stop_at:
            break
        rng = random.Random(f"grpo-{rc.seed}-{step}")
        batch = rng.sample(pool, min(rc.prompts_per_step, len(pool)))
        prompts = [render_prompt(tok, task.prompt(ex), enable_thinking) for ex in batch]
        seeds = [[sample_seed(rc.seed * 1_000_003 + step, ex.id, j) for j in range(rc.group_size)] for ex in batch]
        model.eval()
        outs = backend.generate(prompts, sampling, seeds)
        seqs, resp, rew = [], [], []
        for ex, prompt, comps in zip(batch, prompts, outs):
            p_ids = tok.encode(prompt, add_special_tokens=False)
            row = []
            for c in comps:
                # Sampled text re-encoded: exact for the toy's tokenizer; for BPE tokenizers it is the
                # canonical tokenization of the same text (old and new log-probs use the same one).
                c_ids = tok.encode(c.text, add_special_tokens=False) + ([eos] if c.finish_reason == "stop" else [])
                seqs.append(p_ids + c_ids)
                resp.append(len(p_ids))
                row.append(1.0 if task.score(ex, c.text, c.finish_reason).correct else 0.0)
            rew.append(row)
        rewards = torch.tensor(rew)
        adv = group_advantages(rewards).reshape(-1)
        rewards_log.append(float(rewards.mean()))
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        rmask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
            rmask[i, resp[i]:len(s)] = 1
        ids, mask, rmask, adv = ids.to(device), mask.to(device), rmask.to(device), adv.to(device)
        live = (adv != 0).nonzero()[:, 0].tolist()       # groups that all agree carry no signal
        if live and rc.lr > 0:
            mb = rc.micro_batch
            with torch.no_grad():
                old = torch.cat([_token_logps(model, ids[i:i + mb], mask[i:i + mb], rmask[i:i + mb])
                                 for i in range(0, len(seqs), mb)])
                refl = None
                if ref_model is not None:
                    refl = torch.cat([_token_logps(ref_model, ids[i:i + mb], mask[i:i + mb], rmask[i:i + mb])
                                      for i in range(0, len(seqs), mb)])
            model.train()
            with torch.enable_grad():
                for _ in range(rc.ppo_epochs):
                    opt.zero_grad(set_to_none=True)
                    n = len(seqs)
                    for i in range(0, n, mb):
                        sl = slice(i, i + mb)
                        logp = _token_logps(model, ids[sl], mask[sl], rmask[sl])
                        loss = grpo_loss(logp, old[sl], None if refl is None else refl[sl], adv[sl], rmask[sl],
                                         rc.clip_eps, rc.kl_beta) / n
                        loss.backward()
                    if rc.max_grad_norm > 0:
                        torch.nn.utils.clip_grad_norm_(list(params.values()), rc.max_grad_norm)
                    opt.step()
            opt.zero_grad(set_to_none=True)
            model.eval()
        bar.set_postfix(reward=f"{rewards_log[-1]:.3f}")
        done = step + 1
        if done % rc.eval_every == 0 or done == rc.steps:
            validate(done)
        if done % rc.save_every == 0 or done == rc.steps or (stop_at is not None and done >= stop_at):
            extra = {"rewards": rewards_log, "val": val_log, "best": best, "best_step": best_step}
            if ref is not None:
                extra["ref"] = ref
            state_file.save(snapshot(model, opt, None, done, **extra))
    if len(rewards_log) == rc.steps and rc.keep_best and best is not None:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(best[n].to(p.device))
    return {"rewards": rewards_log, "val": val_log, "best_step": best_step, "resumed_at": resumed_at}


# ------------------------------------------------------------------ the method

def _digest(examples: list) -> str:
    h = hashlib.sha256()
    for x, y in examples:
        h.update(x.detach().cpu().contiguous().numpy().tobytes())
        h.update(y.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@register_method("reasoning_qat")
class ReasoningQAT:
    Config = ReasoningQATConfig
    quantizes = True
    uses_calibration = True

    def __init__(self, cfg: ReasoningQATConfig):
        check_config(cfg)
        self.cfg = cfg

    # -- pieces, usable on their own (tests, benchmarks) --------------------------------

    def training_data(self, model, ctx: QuantContext, calib_ids: Optional[torch.Tensor] = None
                      ) -> tuple[list, list, DataReport]:
        """(training examples, validation examples, report). Call before the model is quantized: data=task
        traces come from it."""
        cfg, tok = self.cfg, ctx.tokenizer
        if cfg.data == "task":
            from harness.pipeline import render_prompt
            from harness.quant.finetune_signal import _greedy_generator, weights_fingerprint
            task = make_task(cfg.task)
            exs = task.train_examples(cfg.n_train + cfg.n_val, cfg.seed)
            prompts = [render_prompt(tok, task.prompt(ex), getattr(task.cfg, "enable_thinking", None)) for ex in exs]
            model_key = (f"{getattr(tok, 'name_or_path', '')}@"
                         f"{weights_fingerprint((n, p) for n, p in model.state_dict().items())}")
            docs, report = trace_documents(prompts, tok, _greedy_generator(model, tok, ctx.device, ctx.progress),
                                           cache_dir=ctx.cache_dir, model_key=model_key, mask_prompts=cfg.mask_prompts,
                                           max_new_tokens=cfg.max_new_tokens or task.cfg.sampling.max_new_tokens,
                                           what="method.data=task")
            report.how += f" on {len(prompts)} {cfg.task} training prompts"
        else:
            if cfg.data == "calib":
                if calib_ids is None:
                    raise UserError("method.data=calib needs a calibration set: set calib=...")
                ids = calib_ids
            else:
                try:
                    ids = calibration_ids(cfg.data, tok, cache_dir=ctx.cache_dir,
                                          generate=_greedy(model, tok, ctx.device, ctx.progress))
                except UserError as e:
                    raise UserError(str(e).replace("calib.", "method.data.")) from None
            docs, report = examples_from_rows(ids, tok, packing=cfg.packing, mask_prompts=cfg.mask_prompts)
        train_ex, val_ex = holdout(docs, min(cfg.n_val, max(0, len(docs) - 1)), cfg.seed)
        train_ex, report = finish(train_ex, report, cfg.seq_len)
        val_ex = finish(val_ex, DataReport(), cfg.seq_len)[0]
        report.extra.update(validation_rows=len(val_ex))
        if not train_ex:
            raise UserError("reasoning_qat: no token to train on (every label is masked)")
        return train_ex, val_ex, report

    def ptq_init(self, model, ctx: QuantContext, calib_ids: Optional[torch.Tensor]) -> dict:
        """Quantize `model` in place with the init method; then swap in FakeQuantLinear modules seeded from
        its codes. Returns the fake-quant modules by name."""
        cfg = self.cfg
        linears = quantizable_linears(model, cfg.include, cfg.exclude)
        if not linears:
            raise UserError(f"method.include={cfg.include!r} selects no Linear module of this model")
        for name, lin in linears.items():
            ctx.spec.check_width(name, lin.in_features)
        codes = None
        fp = ({n: lin.weight.detach().clone() for n, lin in linears.items()}
              if cfg.latent == "projected" and cfg.init != "none" else None)
        if cfg.init != "none":
            ptq = init_method(cfg)
            sub = dataclasses.replace(ctx, method_cfg=ptq.cfg,
                                      calib=(lambda: calib_ids) if calib_ids is not None else ctx.calib)
            codes = ptq.quantize(model, sub).layers
            missing = [n for n in linears if n not in codes]
            if missing:
                raise RuntimeError(f"init method {cfg.init!r} left {len(missing)} linears unquantized: {missing[:3]}")
            linears = quantizable_linears(model, cfg.include, cfg.exclude)   # same modules (quantized in place)
        return fakequant.attach(model, linears, ctx.spec, codes, learn_scale=cfg.learn_scales, fp_weights=fp)

    def examples(self, ids: torch.Tensor, tok) -> tuple[list, str]:
        """Training examples out of packed token rows (harness.train.data.examples_from_rows), and how made."""
        ex, report = examples_from_rows(ids, tok, packing=self.cfg.packing, mask_prompts=self.cfg.mask_prompts,
                                        seq_len=self.cfg.seq_len)
        if not ex:
            raise UserError("reasoning_qat: no token to train on (every label is masked)")
        return ex, report.how

    def state_files(self, model, ctx: QuantContext, data_digest: str) -> tuple[StateFile, StateFile]:
        from harness.quant.finetune_signal import weights_fingerprint
        from harness.store import stable_hash
        key = {"method": dataclasses.asdict(self.cfg), "quant": dataclasses.asdict(ctx.spec), "data": data_digest,
               "model": weights_fingerprint((n, p) for n, p in model.state_dict().items()),
               "tokenizer": getattr(ctx.tokenizer, "name_or_path", None)}
        if ctx.cache_dir is None:
            return StateFile(None, key), StateFile(None, key)
        h = stable_hash(key)
        root = Path(ctx.cache_dir).expanduser() / "reasoning_qat" / "train"
        return StateFile(root / f"{h}-qat.pt", {**key, "phase": "qat"}), StateFile(root / f"{h}-rl.pt", {**key, "phase": "rl"})

    # -- the whole method -----------------------------------------------------------------

    def quantize(self, model, ctx: QuantContext, *, stop_at: Optional[int] = None) -> QuantResult:
        """`stop_at`: stop (raise TrainingStopped) after that many training steps in all (QAT steps, then RL
        steps), with the state saved, as a preempted job would; a later call resumes from there."""
        cfg = self.cfg
        tok = ctx.tokenizer
        if tok is None:
            raise UserError("method=reasoning_qat needs the model's tokenizer")
        t0 = time.perf_counter()
        info: dict[str, Any] = {"init": cfg.init, "objective": cfg.objective}
        calib_ids = ctx.calibration_ids() if ctx.calib is not None else None
        examples, val_examples, report = self.training_data(model, ctx, calib_ids)
        print(report.line("reasoning_qat training data") + f"; {len(val_examples)} validation rows", flush=True)
        info.update(train_data=report.how, train_examples=len(examples), data_report=report.as_dict(),
                    data_seconds=round(time.perf_counter() - t0, 3))
        qat_file, rl_file = self.state_files(model, ctx, _digest(examples + val_examples))
        steps = loop_config(cfg, len(examples)).steps
        teacher = None
        if cfg.objective == "kd" and steps > 0:
            teacher = copy.deepcopy(model).eval()          # the unquantized model, never quantized
            for p in teacher.parameters():
                p.requires_grad_(False)
        for p in model.parameters():
            p.requires_grad_(False)
        t1 = time.perf_counter()
        self.ptq_init(model, ctx, calib_ids)
        info["ptq_seconds"] = round(time.perf_counter() - t1, 3)
        t2 = time.perf_counter()
        if steps > 0:
            out = train_qat(model, teacher, examples, cfg, pad_id=pad_id_of(tok), state_file=qat_file,
                            val_examples=val_examples, progress=ctx.progress, stop_at=stop_at)
            info.update(qat_steps=steps, qat_losses=out["losses"], qat_val=out["val"], qat_best_step=out["best_step"],
                        qat_resumed_at=out["resumed_at"])
            if len(out["losses"]) < steps:
                raise TrainingStopped(f"reasoning_qat stopped after QAT step {len(out['losses'])} (state saved)")
            if out["val"]:
                print(f"reasoning_qat: validation {cfg.objective} loss {out['val'][0][1]:.4f} at step 0 (PTQ), "
                      f"best {min(v for _, v in out['val']):.4f} at step {out['best_step']} of {steps}", flush=True)
        info["qat_seconds"] = round(time.perf_counter() - t2, 3)
        del teacher
        if cfg.rl.enabled and cfg.rl.steps > 0:
            t3 = time.perf_counter()
            task = make_task(cfg.rl.task or cfg.task)
            rl_stop = None if stop_at is None else max(0, stop_at - steps)
            out = train_grpo(model, tok, task, cfg, device=ctx.device, state_file=rl_file, progress=ctx.progress,
                             stop_at=rl_stop)
            info.update(rl_rewards=out["rewards"], rl_val=out["val"], rl_best_step=out["best_step"],
                        rl_resumed_at=out["resumed_at"],
                        rl_seconds=round(time.perf_counter() - t3, 3))
            if len(out["rewards"]) < cfg.rl.steps:
                raise TrainingStopped(f"reasoning_qat stopped after RL step {len(out['rewards'])} (state saved)")
            print("reasoning_qat grpo mean reward per step: " + " ".join(f"{r:.2f}" for r in out["rewards"])
                  + "; validation accuracy " + " ".join(f"{s_}:{v:.3f}" for s_, v in out["val"])
                  + f"; kept step {out['best_step']}", flush=True)
        result = fakequant.detach(model)
        for p in model.parameters():
            p.requires_grad_(False)
        if not cfg.keep_checkpoints:
            qat_file.remove()
            rl_file.remove()
        info["seconds"] = round(time.perf_counter() - t0, 3)
        result.info["reasoning_qat"] = info
        return result


def _greedy(model, tok, device, progress):
    from harness.quant.finetune_signal import _greedy_generator
    return _greedy_generator(model, tok, device, progress)


__all__ = ["ReasoningQAT", "ReasoningQATConfig", "RLConfig", "kd_loss", "sft_loss", "train_qat", "train_grpo",
           "group_advantages", "grpo_loss", "batch_order", "collate", "StateFile", "TrainingStopped"]
