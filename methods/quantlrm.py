"""QuantLRM (arXiv 2602.02581): AWQ's scale search driven by fine-tuning signals instead of activations.

The channels a reasoning fine-tune touched least *and* most are the ones to protect. For every
quantized linear, ΔW = |W_ft − W_base| (fp32). Over all strictly positive updates of all linears,
global x_min, exact median x_mid and x_max define a restricted quadratic y(x) ∈ [1, R] that is R at
both ends and 1 at the median (harness.quant.finetune_signal.quadratic_map; zero updates get y = 1).
The importance of input channel j of a linear is

    importance_j = mean_i y_ij × (#{i : ΔW_ij = 0} + 1)

and it replaces AWQ's mean |activation| in AWQ's own search (methods.awq.search_scale, reused through
the `importance` hook): s = importance^α over a grid of 20 α in [0, 1), without AWQ's max/min
normalisation by default, loss = MSE of the block output on calibration activations; then AWQ's
clip search and quantization on the shared grid.

Where the signals come from:
  - a (base, fine-tuned) pair: the model being quantized is the fine-tuned one; `method.base_model`
    (local dir, hub id, or a toy zoo name; conf/method/quantlrm.yaml defaults it to `model.base`;
    null = the base a toy zoo checkpoint declares) is read one linear at a time from its safetensors files;
  - `method.pseudo_finetune=true`: no pair exists, so the model is briefly fine-tuned in place on
    reasoning traces (`method.pft.*`, see finetune_signal.PFTConfig), ΔW is taken against the
    starting weights, and the model is restored bit for bit before quantization.
Signals are cached under ${cache_dir}/quantlrm/signals, keyed by both models' identities and the options
that change them, and shared by every ablation and bit width.

Scale groups with several linears (qkv, gate_up) take their importance from the group's first linear
(q_proj, gate_proj), as the authors' code does (`method.group_signal=first`); `stack` treats the
group's linears as one matrix stacked by rows. The authors' OLMo-3 setting scales only o and down:
`method.groups=[o,down]`, the default on OLMo-2/3 (post-norm: the descriptor has only o and down), with the
quadratic's statistics over o_proj/down_proj only (`method.signal_scope=groups`; QuantLRM
quadratic_mapping_olmo3.py).

Ablations (`method.importance`): quantlrm | quadratic (mean y only) | zeros (zero count + 1 only) |
activation (AWQ's activation magnitude through this same search, i.e. plain AWQ with this config's
normalisation setting; needs no fine-tuning signal).
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from harness.quant.context import QuantContext
from harness.quant.finetune_signal import (IMPORTANCE_KINDS, ZERO_COUNT_DTYPES, CheckpointWeights, PFTConfig, Signals,
                                           check_pft, code_version, compute_signals, declared_base, load_or_compute,
                                           local_checkpoint, pair_delta, pft_examples, pft_ids, pseudo_finetuned,
                                           resolve_checkpoint, weights_fingerprint)
from harness.quant.runner import on_device
from harness.quant.select import quantizable_linears
from harness.registry import register_method
from harness.types import check_values, QuantResult, UserError
from harness import arch
from methods.awq import AWQ, AWQConfig

IMPORTANCES = (*IMPORTANCE_KINDS, "activation")
GROUP_SIGNALS = ("first", "stack")
SIGNAL_SCOPES = ("groups", "all")


@dataclass
class QuantLRMConfig(AWQConfig):
    normalize_scales: bool = False          # the authors removed AWQ's s / sqrt(max·min)
    gqa_o: str = "per_head"                 # GQA o_proj: search per query-head channel, average the winning
                                            # scales over the heads sharing a kv channel (the authors' downsample_scales)
    base_model: Optional[str] = None        # local dir | hub id | toy zoo name; null: the toy zoo's declared base
    base_revision: Optional[str] = None
    importance: str = "quantlrm"            # quantlrm | quadratic | zeros | activation
    ratio: float = 10.0                     # R: y ranges over [1, R]
    zero_count_dtype: str = "fp32"          # fp32 | fp16 (the authors' code: ΔW cast to fp16 before counting)
    group_signal: str = "first"             # first | stack: which linears of a multi-linear group give its signal
    signal_scope: str = "groups"            # groups: the quadratic's statistics over the linears of the searched groups
                                            # (the authors: all seven on Qwen3, o_proj/down_proj on OLMo-3) | all
    pseudo_finetune: bool = False           # true: signals from a brief fine-tune (method.pft); base_model is ignored
    pft: PFTConfig = field(default_factory=PFTConfig)


def check_quantlrm(cfg: QuantLRMConfig) -> None:
    checks = [("importance", cfg.importance in IMPORTANCES, ", ".join(IMPORTANCES)),
              ("ratio", cfg.ratio >= 1, "a number >= 1"),
              ("zero_count_dtype", cfg.zero_count_dtype in ZERO_COUNT_DTYPES, ", ".join(ZERO_COUNT_DTYPES)),
              ("group_signal", cfg.group_signal in GROUP_SIGNALS, ", ".join(GROUP_SIGNALS)),
              ("signal_scope", cfg.signal_scope in SIGNAL_SCOPES, ", ".join(SIGNAL_SCOPES))]
    check_values("method", cfg, checks)
    if cfg.pseudo_finetune:
        check_pft(cfg.pft)


@register_method("quantlrm")
class QuantLRM(AWQ):
    Config = QuantLRMConfig
    quantizes = True
    uses_calibration = True

    def __init__(self, cfg: QuantLRMConfig):
        super().__init__(cfg)
        check_quantlrm(cfg)
        self.signals: Optional[Signals] = None
        self._names: dict[int, dict[int, str]] = {}

    def quantize(self, model, ctx: QuantContext) -> QuantResult:
        info: dict = {"importance": self.cfg.importance}
        if self.cfg.importance != "activation":
            self.signals, sig_info = self.fine_tune_signals(model, ctx)     # before any weight changes
            info.update(sig_info)
        result = super().quantize(model, ctx)
        result.info["quantlrm"] = info
        return result

    def input_fingerprint(self, model_path: Optional[Path]) -> Optional[dict]:
        """What besides the quantized model determines the result: the base checkpoint's contents, so a
        cached quantized checkpoint is not reused after the base changed (a hub id: its revision)."""
        if self.cfg.pseudo_finetune or self.cfg.importance == "activation":
            return None
        from harness.store import checkpoint_fingerprint
        name = self.cfg.base_model or declared_base(model_path)
        if name is None:
            return None
        local = local_checkpoint(name)
        if local is None:
            return {"base_model": name, "base_revision": self.cfg.base_revision}
        return {"base_model": name, "base_fingerprint": checkpoint_fingerprint(local)}

    # ------------------------------------------------------------------ the AWQ hook

    def importance(self, win, group: arch.Fold, x_abs_mean: torch.Tensor, linears: dict) -> torch.Tensor:
        if self.cfg.importance == "activation":
            return x_abs_mean
        if win.index not in self._names:
            self._names = {win.index: {id(m): n for n, m in win.named_modules()}}
        names = [self._names[win.index][id(m)] for m in linears.values()]
        use = names[:1] if self.cfg.group_signal == "first" else names
        return self.signals.importance(use, self.cfg.importance).to(x_abs_mean.device)

    # ------------------------------------------------------------------ signals

    def fine_tune_signals(self, model, ctx: QuantContext) -> tuple[Signals, dict]:
        """Signals for every quantized linear of `model`, from the disk cache or computed now."""
        cfg = self.cfg
        linears = quantizable_linears(model, cfg.include, cfg.exclude)
        if not linears:
            raise UserError(f"method.include={cfg.include!r} selects no Linear module of this model")
        if cfg.signal_scope == "groups":    # statistics (x_min, median, x_max) over the searched groups' linears only
            fam = arch.check_method(model, self.name)
            wanted = set(self.groups_for(fam))
            rel = tuple("." + n for f in fam.folds if f.name in wanted for n in f.linears)
            linears = {n: m for n, m in linears.items() if n.endswith(rel)}
            if not linears:
                raise UserError(f"method.groups={sorted(wanted)!r} selects no linear of model_type "
                                f"{model.config.model_type!r} to take fine-tuning signals from")
        names = list(linears)
        from harness.store import stable_hash
        key = {"names": stable_hash(names), "ratio": cfg.ratio, "zero_count_dtype": cfg.zero_count_dtype,
               "delta_dtype": "float32", "code": code_version(),
               "fine_tuned": weights_fingerprint((n, linears[n].weight) for n in names)}
        info: dict = {}
        if cfg.pseudo_finetune:
            compute = self._pft_source(model, ctx, names, key, info)
        else:
            compute = self._pair_source(ctx, linears, names, key, info)
        with torch.no_grad():
            signals, path, cached = load_or_compute(ctx.cache_dir, key, compute)
        info.update({"stats": dataclasses.asdict(signals.stats), "signal_cache": str(path) if path else None,
                     "signal_cached": cached, **signals.extra})
        return signals, info

    def _pair_source(self, ctx, linears, names, key, info):
        cfg = self.cfg
        base_name = cfg.base_model or declared_base(ctx.model_path)
        if not base_name:
            raise UserError("method=quantlrm needs the fine-tuned model's base: set method.base_model=<local dir or "
                            "hub id> (the model being quantized is the fine-tuned one), or method.pseudo_finetune=true "
                            "when no base exists")
        base_dir = resolve_checkpoint(base_name, cfg.base_revision)
        reader = CheckpointWeights(base_dir)
        key.update(source="pair", base=str(base_name), base_revision=cfg.base_revision,
                   base_fingerprint=reader.fingerprint())
        info.update(source="pair", base_model=str(base_dir))
        delta = pair_delta(linears, reader)
        return lambda: compute_signals(names, delta, ratio=cfg.ratio, zero_count_dtype=cfg.zero_count_dtype,
                                       progress=ctx.progress)

    def _pft_source(self, model, ctx, names, key, info):
        cfg, pft = self.cfg, self.cfg.pft
        tok = ctx.tokenizer
        model_key = f"{getattr(tok, 'name_or_path', '')}@{key['fine_tuned']}"     # traces of *these* weights
        key.update(source="pseudo_finetune", pft=dataclasses.asdict(pft))
        if pft.data == "calib":       # the run's calibration source is not described by ctx: key on its tokens
            ids = ctx.calibration_ids()
            key["pft_data"] = _digest(ids)
            get_ids = lambda: ids       # noqa: E731
        else:
            if pft.path:
                p = Path(pft.path).expanduser().resolve()
                key["pft_path"] = [str(p), p.stat().st_size, p.stat().st_mtime_ns] if p.is_file() else str(p)
            key["tokenizer"] = getattr(tok, "name_or_path", None)

            def get_ids():
                return pft_ids(pft, model, tok, device=ctx.device, cache_dir=ctx.cache_dir, model_key=model_key,
                               progress=ctx.progress)
        info.update(source="pseudo_finetune")

        def compute() -> Signals:
            # Trace generation and the fine-tuning itself need the whole model on the device (the pipeline
            # keeps a layer-wise method's model on CPU); it goes back before the layer-wise pass.
            with on_device(model, ctx.device):
                ids = get_ids()
                examples, data = pft_examples(ids, tok, pft)
                print(data.line("quantlrm pseudo fine-tune data"), flush=True)
                pad = getattr(tok, "pad_token_id", None)
                pad = pad if pad is not None else (getattr(tok, "eos_token_id", None) or 0)
                with pseudo_finetuned(model, examples, pft, pad_id=pad, progress=ctx.progress) as run:
                    with torch.no_grad():
                        sig = compute_signals(names, run.delta, ratio=cfg.ratio,
                                              zero_count_dtype=cfg.zero_count_dtype, progress=ctx.progress)
            sig.extra = {"pft_steps": len(run.losses), "pft_data": data.how, "pft_examples": len(examples),
                         "pft_loss_tokens": int(sum(int((y[1:] != -100).sum()) for _, y in examples)),
                         "pft_loss_first": run.losses[0], "pft_loss_last": run.losses[-1],
                         "pft_data_report": data.as_dict()}
            return sig
        return compute


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


__all__ = ["QuantLRM", "QuantLRMConfig", "check_quantlrm"]
