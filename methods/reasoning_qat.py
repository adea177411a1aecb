"""Reasoning-QAT (arXiv 2601.14888): PTQ-initialised quantization-aware training with knowledge
distillation on reasoning traces, then (optionally) GRPO with a verifiable reward.

Only the paper's abstract is public; it gives four findings this method is built around: KD is a
robust objective, PTQ is a strong initialisation, RL helps once the model is a viable starting
point, and calibrating the PTQ on the QAT training domain helps. Everything below that is a choice
of ours, exposed in conf/method/reasoning_qat.yaml.

1. Teacher: a copy of the model *before* any quantization (`objective=kd` or RL with a KL term
   needs it; it doubles the model's memory — for big models precomputing teacher logits, or putting
   the teacher on another device, is the way out; not implemented here).
2. Data: token ids from the calibration machinery (harness.calib). `method.data: null` trains on the
   run's own calibration set (`calib`, e.g. calib=reasoning: traces the full-precision model wrote),
   so PTQ calibration and QAT training share a domain by default; a calib-style node
   (`method.data={name: local, path: texts.jsonl, ...}`) trains on something else. Packed chat
   documents are split back into (prompt + response) documents, loss on responses only
   (`mask_prompts`), as QuantLRM's pseudo fine-tune does (finetune_signal.pft_examples).
3. PTQ init: `method.init` names any quantizing method (gptq, rtn, awq, quantlrm, ...; `none` = the
   min/max grid of the fp weights). It quantizes the model in place as it would on its own; its
   codes/scales/zeros then seed FakeQuantLinear modules (harness.quant.fakequant): latent weight =
   the PTQ weight, grid = the PTQ grid, so step 0 of QAT is the PTQ model bit for bit.
4. QAT: every quantized linear trains its latent fp32 weight through the shared quantizer's STE
   (`fake_quantize_ste`), scales optionally learnable (`learn_scales`). Objective `kd`: forward KL
   KL(p_teacher || p_student) of the next-token distributions at temperature T (× T²), averaged over
   the response tokens; `sft`: cross-entropy on the same tokens. AdamW, linear warmup, cosine decay,
   gradient accumulation, optional gradient checkpointing.
5. RL (`rl.enabled`): GRPO from the QAT model with the quantizer in the loop — groups of samples are
   drawn from the fake-quant model (i.e. the deployed quantized model), rewarded 1/0 by the task's
   own scorer (`rl.task`, on training prompts: never the evaluation split), advantages normalised
   within each group, PPO-clipped ratio objective, optional k3 KL to the RL start model (`kl_beta`).
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
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from harness.quant.finetune_signal import collate
from harness.quant.state import StateFile, TrainingStopped
from harness import registry
from harness.calib import CalibConfig, as_calib_config, calibration_ids
from harness.quant import fakequant
from harness.quant.context import MethodConfig, QuantContext
from harness.quant.select import quantizable_linears
from harness.registry import register_method
from harness.types import check_values, Example, QuantResult, Sampling, UserError

OBJECTIVES = ("kd", "sft")
LATENTS = ("projected", "ptq")
RL_PROMPTS = ("toy", "local")


@dataclass
class RLConfig:
    enabled: bool = False
    steps: int = 20
    prompts_per_step: int = 8
    group_size: int = 8               # samples per prompt (the GRPO group)
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 128
    lr: float = 1.0e-5
    clip_eps: float = 0.2
    kl_beta: float = 0.0              # > 0: k3 KL to the model at the start of RL (a frozen copy)
    ppo_epochs: int = 1               # optimizer passes over each batch of samples
    micro_batch: int = 16             # sequences per forward/backward
    max_grad_norm: float = 1.0
    task: str = "arith"               # whose scorer gives the reward (and renders the prompts)
    prompts: str = "toy"              # toy: the toy task's *training* problems | local: jsonl (prompt_key, answer_key)
    path: Optional[str] = None
    prompt_key: str = "problem"
    answer_key: str = "answer"
    n_prompts: int = 1024             # size of the prompt pool
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
    data: Optional[CalibConfig] = None   # null: the run's calib set; else a calib-style node
    mask_prompts: bool = True
    packing: bool = False
    seq_len: Optional[int] = None     # cut training documents to this many tokens (null: as built)
    steps: int = 200
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1.0e-4                # latent weights
    scale_lr: float = 1.0e-5          # learnable scales
    warmup: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
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
              ("seq_len", cfg.seq_len is None or cfg.seq_len >= 2, "null or an integer >= 2"),
              ("steps", cfg.steps >= 0, "an integer >= 0"),
              ("batch_size", cfg.batch_size >= 1, "an integer >= 1"),
              ("grad_accum", cfg.grad_accum >= 1, "an integer >= 1"),
              ("lr", cfg.lr >= 0, ">= 0"), ("scale_lr", cfg.scale_lr >= 0, ">= 0"),
              ("warmup", cfg.warmup >= 0, "an integer >= 0"),
              ("weight_decay", cfg.weight_decay >= 0, ">= 0"),
              ("max_grad_norm", cfg.max_grad_norm >= 0, ">= 0 (0: no clipping)"),
              ("save_every", cfg.save_every >= 1, "an integer >= 1")]
    r = cfg.rl
    checks += [("rl.steps", r.steps >= 0, "an integer >= 0"),
               ("rl.prompts_per_step", r.prompts_per_step >= 1, "an integer >= 1"),
               ("rl.group_size", r.group_size >= 2, "an integer >= 2 (advantages are relative to the group)"),
               ("rl.temperature", r.temperature > 0, "> 0 (GRPO samples)"),
               ("rl.top_p", 0 < r.top_p <= 1, "(0, 1]"),
               ("rl.max_new_tokens", r.max_new_tokens >= 1, "an integer >= 1"),
               ("rl.lr", r.lr >= 0, ">= 0"), ("rl.clip_eps", 0 < r.clip_eps < 1, "(0, 1)"),
               ("rl.kl_beta", r.kl_beta >= 0, ">= 0"), ("rl.ppo_epochs", r.ppo_epochs >= 1, "an integer >= 1"),
               ("rl.micro_batch", r.micro_batch >= 1, "an integer >= 1"),
               ("rl.max_grad_norm", r.max_grad_norm >= 0, ">= 0"),
               ("rl.prompts", r.prompts in RL_PROMPTS, ", ".join(RL_PROMPTS)),
               ("rl.n_prompts", r.n_prompts >= 1, "an integer >= 1"),
               ("rl.save_every", r.save_every >= 1, "an integer >= 1")]
    check_values("method", cfg, checks, get=_get)
    if r.enabled:
        if r.task not in registry.available("task"):
            raise UserError(f"method.rl.task={r.task!r} is not a known task; allowed: "
                            f"{', '.join(registry.available('task'))}")
        if r.prompts == "local" and not r.path:
            raise UserError("method.rl.prompts=local needs method.rl.path=<prompts.jsonl> (one JSON object per line "
                            f"with {r.prompt_key!r} and {r.answer_key!r} fields)")
    if cfg.init != "none":
        act = getattr(init_method(cfg), "act_spec", None)      # the init method's own checks (init_cfg applied)
        if act is not None:
            raise UserError(f"method.init_cfg.act_bits={act.bits} is not allowed: Reasoning-QAT trains weight-only "
                            f"fake-quant linears; allowed: null")
    if cfg.data is not None:
        try:
            as_calib_config(cfg.data)
        except UserError as e:
            raise UserError(str(e).replace("calib.", "method.data.")) from None


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


# ------------------------------------------------------------------ training state on disk

def _trainable(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _snapshot(model, opt, sched, step: int, **extra) -> dict:
    return {"step": step, "params": {n: p.detach().cpu().clone() for n, p in _trainable(model).items()},
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict() if sched is not None else None, **extra}


@torch.no_grad()
def _restore(model, opt, sched, state: dict) -> None:
    params = _trainable(model)
    if set(params) != set(state["params"]):
        raise RuntimeError("saved training state does not match the model's trainable parameters")
    for n, p in params.items():
        p.copy_(state["params"][n].to(p.device))
    opt.load_state_dict(state["optimizer"])
    if sched is not None and state.get("scheduler") is not None:
        sched.load_state_dict(state["scheduler"])


def _resume(state_file: StateFile, model, opt, sched, log_key: str) -> tuple[Optional[dict], int, list]:
    """(saved state or None, step to start at, the log so far) — the model and optimizer restored if saved."""
    saved = state_file.load()
    if saved is None:
        return None, 0, []
    _restore(model, opt, sched, saved)
    return saved, saved["step"], list(saved[log_key])


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


def _lr_lambda(warmup: int, steps: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
    return f


def batch_order(n_examples: int, n_rows: int, seed: int) -> list[int]:
    """Example indices for n_rows rows: concatenated seeded permutations (epochs). A pure function of
    its arguments, so a resumed run draws exactly the batches the interrupted one would have."""
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < n_rows:
        order += torch.randperm(n_examples, generator=gen).tolist()
    return order[:n_rows]


def train_qat(model, teacher, examples, cfg: ReasoningQATConfig, *, pad_id: int, state_file: StateFile,
              progress: bool = True, stop_at: Optional[int] = None) -> dict:
    """QAT of the fake-quant `model` on (ids, labels) examples. Returns {"losses": [...], "resumed_at": int}.

    `stop_at`: leave after that many steps (having saved the state), as a preempted job would.
    """
    params = _trainable(model)
    weights = [p for n, p in params.items() if not n.endswith(".scale")]
    scales = [p for n, p in params.items() if n.endswith(".scale")]
    groups = [{"params": weights, "lr": cfg.lr}] + ([{"params": scales, "lr": cfg.scale_lr}] if scales else [])
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.warmup, cfg.steps))
    _, start, losses = _resume(state_file, model, opt, sched, "losses")
    resumed_at = start
    rows_per_step = cfg.batch_size * cfg.grad_accum
    order = batch_order(len(examples), cfg.steps * rows_per_step, cfg.seed)
    device = next(iter(params.values())).device if params else torch.device("cpu")
    gc_was = bool(getattr(model, "is_gradient_checkpointing", False))
    if cfg.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    bar = tqdm(range(start, cfg.steps), desc=f"reasoning_qat {cfg.objective}", unit="step", disable=not progress,
               initial=start, total=cfg.steps)
    try:
        with torch.enable_grad():
            for step in bar:
                if stop_at is not None and step >= stop_at:
                    break
                opt.zero_grad(set_to_none=True)
                total = 0.0
                rows = order[step * rows_per_step:(step + 1) * rows_per_step]
                for a in range(cfg.grad_accum):
                    micro = [examples[i] for i in rows[a * cfg.batch_size:(a + 1) * cfg.batch_size]]
                    ids, mask, labels = collate(micro, pad_id, device, cfg.seq_len)
                    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                    if cfg.objective == "kd":
                        with torch.no_grad():
                            t_logits = teacher(input_ids=ids, attention_mask=mask, use_cache=False).logits
                        loss = kd_loss(logits, t_logits, labels, cfg.temperature)
                    else:
                        loss = sft_loss(logits, labels)
                    if not torch.isfinite(loss):
                        raise RuntimeError("reasoning_qat: the training loss is not finite (lower method.lr?)")
                    (loss / cfg.grad_accum).backward()
                    total += float(loss.detach()) / cfg.grad_accum
                if cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
                opt.step()
                sched.step()
                losses.append(total)
                bar.set_postfix(loss=f"{total:.4f}")
                done = step + 1
                if done % cfg.save_every == 0 or done == cfg.steps or (stop_at is not None and done >= stop_at):
                    state_file.save(_snapshot(model, opt, sched, done, losses=losses))
    finally:
        model.eval()
        if cfg.gradient_checkpointing and not gc_was and hasattr(model, "gradient_checkpointing_disable"):
            model.gradient_checkpointing_disable()
        opt.zero_grad(set_to_none=True)
    return {"losses": losses, "resumed_at": resumed_at}


# ------------------------------------------------------------------ GRPO

def rl_examples(rc: RLConfig) -> list[Example]:
    """Training prompts with verifiable answers (never the task's evaluation split)."""
    if rc.prompts == "toy":
        from harness.toy import arith
        return [Example(id=f"rl-{i}", question=p.question(), gold=str(p.answer))
                for i, p in enumerate(arith.problems("train", rc.n_prompts, rc.seed))]
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
    return out[:rc.n_prompts]


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
    """GRPO on the fake-quant model. Returns {"rewards": [mean reward per step], "resumed_at": int}."""
    from harness.backends.hf import HFBackend, HFBackendConfig
    from harness.pipeline import render_prompt
    from harness.seeding import sample_seed
    rc = cfg.rl
    pool = rl_examples(rc)
    params = _trainable(model)
    opt = torch.optim.AdamW(list(params.values()), lr=rc.lr, weight_decay=0.0)
    saved, start, rewards_log = _resume(state_file, model, opt, None, "rewards")
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
        ref = {n: p.detach().cpu().clone() for n, p in _trainable(model).items()} if ref is None else ref
    else:
        ref_model = None
    backend = HFBackend(HFBackendConfig(batch_size=rc.prompts_per_step * rc.group_size), model, tok, device,
                        progress=False)
    eos = tok.eos_token_id
    pad = backend.pad_id
    enable_thinking = getattr(task.cfg, "enable_thinking", None)
    sampling = Sampling(n=rc.group_size, temperature=rc.temperature, top_p=rc.top_p,
                        max_new_tokens=rc.max_new_tokens, seed=rc.seed)
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
        if done % rc.save_every == 0 or done == rc.steps or (stop_at is not None and done >= stop_at):
            extra = {"rewards": rewards_log}
            if ref is not None:
                extra["ref"] = ref
            state_file.save(_snapshot(model, opt, None, done, **extra))
    return {"rewards": rewards_log, "resumed_at": resumed_at}


# ------------------------------------------------------------------ the method

def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def _greedy(model, tok, device, progress):
    from harness.quant.finetune_signal import _greedy_generator
    return _greedy_generator(model, tok, device, progress)


@register_method("reasoning_qat")
class ReasoningQAT:
    Config = ReasoningQATConfig
    quantizes = True
    uses_calibration = True

    def __init__(self, cfg: ReasoningQATConfig):
        check_config(cfg)
        self.cfg = cfg

    # -- pieces, usable on their own (tests, benchmarks) --------------------------------

    def training_ids(self, model, ctx: QuantContext) -> torch.Tensor:
        """Token ids [n, seq_len] to train on (call before the model is quantized: traces come from it)."""
        if self.cfg.data is None:
            return ctx.calibration_ids()
        try:
            return calibration_ids(self.cfg.data, ctx.tokenizer, cache_dir=ctx.cache_dir,
                                   generate=_greedy(model, ctx.tokenizer, ctx.device, ctx.progress))
        except UserError as e:
            raise UserError(str(e).replace("calib.", "method.data.")) from None

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
        from harness.quant.finetune_signal import pft_examples
        shim = type("S", (), {"packing": self.cfg.packing, "mask_prompts": self.cfg.mask_prompts})()
        ex, how = pft_examples(ids, tok, shim)
        ex = [(x, y) for x, y in ex if bool((y[1:] != -100).any())]
        if not ex:
            raise UserError("reasoning_qat: no token to train on (every label is masked)")
        return ex, how

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
        train_ids = calib_ids if cfg.data is None else self.training_ids(model, ctx)
        if train_ids is None:
            raise UserError("method=reasoning_qat needs training data: set calib=... or method.data")
        qat_file, rl_file = self.state_files(model, ctx, _digest(train_ids))
        teacher = None
        if cfg.objective == "kd" and cfg.steps > 0:
            teacher = copy.deepcopy(model).eval()          # the unquantized model, never quantized
            for p in teacher.parameters():
                p.requires_grad_(False)
        for p in model.parameters():
            p.requires_grad_(False)
        t1 = time.perf_counter()
        self.ptq_init(model, ctx, calib_ids)
        info["ptq_seconds"] = round(time.perf_counter() - t1, 3)
        examples, how = self.examples(train_ids, tok)
        info.update(train_data=how, train_examples=len(examples))
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        t2 = time.perf_counter()
        if cfg.steps > 0:
            out = train_qat(model, teacher, examples, cfg, pad_id=pad, state_file=qat_file, progress=ctx.progress,
                            stop_at=stop_at)
            info.update(qat_losses=out["losses"], qat_resumed_at=out["resumed_at"])
            if len(out["losses"]) < cfg.steps:
                raise TrainingStopped(f"reasoning_qat stopped after QAT step {len(out['losses'])} (state saved)")
        info["qat_seconds"] = round(time.perf_counter() - t2, 3)
        del teacher
        if cfg.rl.enabled and cfg.rl.steps > 0:
            t3 = time.perf_counter()
            task_cls = registry.get("task", cfg.rl.task)
            task = task_cls(task_cls.Config(name=cfg.rl.task))
            rl_stop = None if stop_at is None else max(0, stop_at - cfg.steps)
            out = train_grpo(model, tok, task, cfg, device=ctx.device, state_file=rl_file, progress=ctx.progress,
                             stop_at=rl_stop)
            info.update(rl_rewards=out["rewards"], rl_resumed_at=out["resumed_at"],
                        rl_seconds=round(time.perf_counter() - t3, 3))
            if len(out["rewards"]) < cfg.rl.steps:
                raise TrainingStopped(f"reasoning_qat stopped after RL step {len(out['rewards'])} (state saved)")
        result = fakequant.detach(model)
        for p in model.parameters():
            p.requires_grad_(False)
        if not cfg.keep_checkpoints:
            qat_file.remove()
            rl_file.remove()
        info["seconds"] = round(time.perf_counter() - t0, 3)
        result.info["reasoning_qat"] = info
        return result


__all__ = ["ReasoningQAT", "ReasoningQATConfig", "RLConfig", "kd_loss", "sft_loss", "train_qat", "train_grpo",
           "group_advantages", "grpo_loss", "batch_order", "StateFile", "TrainingStopped"]
