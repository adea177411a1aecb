"""SliderQuant (arXiv 2603.25284): sliding-window layer reconstruction with learnable scales and low-rank.

Inter-layer sliding windows. L decoder layers are visited by a schedule of windows of consecutive
layers (``window_schedule``): the shallow layers 0..L_s-1 by *expanding* windows anchored at layer 0
([0], [0,1], ..., [0..L_s-1]); the middle by *fixed* windows of size w and stride s that overlap the
shallow and the deep region by one layer; the deep layers by *shrinking* windows anchored at the last
layer ([L-L_d..L-1], ..., [L-1]). Defaults L_s = L_d = 4, w = 2, s = 1 (32 layers: 33 windows).
``method.windows="0-3,2-5,..."`` replaces the schedule by a hand-written one (inclusive ranges).

Every window trains, on calibration data, the learnable parameters of its layers so that the
window's quantized output on its *quantized* inputs matches the full-precision model's output
on the full-precision inputs (MSE). Both trajectories are carried from window to window: the runner
feeds the quantized one (its layers keep fake-quantizing while they are visited), this module carries
the full-precision one. A layer visited by several overlapping windows keeps its parameters from one
window to the next and goes on training them (a fresh AdamW per window, as the authors' code).

Intra-layer incremental quantization: the whole schedule runs once per stage; in stage 1 only the
first ceil(gamma * in_features) input columns of each weight are fake-quantized (on the grid of the
whole weight), in stage 2 all of them (gamma = 1: one stage). ``epochs`` is the total over stages,
split evenly (the authors' code: epochs // quant_step; here rounded up, so epochs=1 still trains).

Learnable parameters per linear (``_SliderLinear``):
  alpha  per input channel, init 1, shared by a scale group (q/k/v; o; gate/up; down — the AWQ groups):
         the layer computes (x / alpha) Q(W * alpha + (lora_alpha / r) B A)^T, and after training 1/alpha is folded into the
         preceding op (input norm, v_proj rows, post-attention norm, up_proj rows) exactly as AWQ folds;
  B A    rank-r correction added before quantization, scaled by lora_alpha / r as the authors' LoRA layer
         (`int_linear_lora.py`; lora_alpha 1 there) (A kaiming-uniform, B zero);
  clip   OmniQuant-style learnable weight clipping: per (row, group) sigmoid(u) * max, sigmoid(l) * min,
         init 4.0.
Rounding goes through the shared quantizer's straight-through estimator (`fake_quantize_ste`).

After both stages everything is folded into plain weights and quantized with the shared quantizer
(`quantize_weight`) on the learned clipped grid, so the exporter writes the result like any other
method's.

Weight-activation mode (``act_bits=4``: W4A4). As in the authors' code, the fp model is first rotated
offline (QuaRot's R1, `harness.quant.rotation`; ``rotate``, on by default in this mode) and every
quantized linear fake-quantizes its input per token (dynamic, asymmetric unless ``act_sym``) while the
window trains, after the 1/alpha scaling and with the same gamma column split as the weights. The result
records the activation spec; the exported checkpoint carries it and the HF backend runs it (forward
pre-hooks, `harness.quant.actquant`). vLLM cannot serve fake activation quantization: backend=vllm is
refused and backend=auto picks hf.
The attention matmuls' inputs are quantized too, as the authors' code does (``qkv_quant``, on by default):
main.py sets q/k/v_quant_params = {n_bits: abits, symmetric: False, dynamic_method: per_token} and
p_quant_params = {n_bits: 16} (a no-op in quantize/quantizer.py); models/int_llama_layer.py quantizes
query_states and key_states after q_norm/k_norm and RoPE, keys and values after the cache update and repeat_kv,
each (batch, head, token) vector of head_dim values on its own asymmetric min/max grid (whatever ``act_sym``
says: the authors' q/k/v are asymmetric), with the stage's quant rate (``gamma``) like every other quantizer,
off for the full-precision teacher. P = softmax(Q K^T) stays in full precision. Here the attention of every
decoder layer that has quantized linears does this (through a transformers attention function,
`harness.quant.actquant.install_attention`; linear-attention layers have no such matmuls), and the result and the
checkpoint record it beside the linear-input spec. ``qkv_quant=false`` keeps only the linear inputs quantized
(rqbench before this option).

No lost work: after every trained window the learnable parameters of every layer visited so far are saved
(`harness.quant.state.StateFile`, under cache_dir/sliderquant/train/, keyed by config, calibration tokens
and model weights). A rerun after a kill resumes: finished stages are skipped, finished windows of the
current one replay without training (their layers hold the saved parameters, so the quantized trajectory
is passed on exactly as before), and the result is bit-identical to an uninterrupted run.

Defaults follow the authors' configs per setting (null keys): weight-only settings run their `lora_only`
mode (low-rank + clipping, no scales; low-rank lr 5e-4 — configs/llama2-7b-w2a16), 60 epochs at 2 bits,
20 otherwise; W4A4 runs `slider` (scales too, low-rank lr 1e-4, 20 epochs); batch 3. `mode=slider` (or
`scales=true`) and `lora_alpha=<rank>` give the earlier rqbench behaviour (scales on at W3/W4A16, B A
unscaled) as ablations.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from harness.quant import actquant
from harness.quant.actquant import ActSpec, fake_quantize_tokens
from harness.quant.context import MethodConfig, QuantContext
from harness.quant.quantizer import QuantSpec, _grouped, fake_quantize_ste, qparams_from_range, quantize_weight
from harness.quant.rotation import rotate_model
from harness.quant.state import StateFile, TrainingStopped
from harness.quant.runner import LayerwiseRunner, _check_windows, _first_tensor, on_device
from harness.registry import register_method
from harness.train.loop import lr_lambda
from harness.types import check_values, QuantizedLinear, QuantResult, UserError
from harness import arch
from harness.quant import fold as folding
from methods.awq import GROUP_NAMES


@dataclass
class SliderQuantConfig(MethodConfig):
    # --- inter-layer windows
    windows: Optional[str] = None       # hand-written schedule "0-3,2-5,..." (inclusive layer ranges); null: below
    shallow: int = 4                    # L_s: layers visited by expanding windows anchored at 0 (0: none)
    deep: int = 4                       # L_d: layers visited by shrinking windows anchored at L-1 (0: none)
    window_size: int = 2                # w: middle windows
    stride: int = 1                     # s: middle windows
    # --- intra-layer incremental quantization
    gamma: float = 0.5                  # stage 1 quantizes the first ceil(gamma*in) columns, stage 2 all (1.0: one stage)
    # --- learnable parameters
    mode: Optional[str] = None          # lora_only: low-rank + clipping | slider: + per-channel scales; null: as the
                                        # authors' configs ("slider is for W4A4, lora_only is for WXA16"): lora_only
                                        # weight-only, slider with act_bits
    scales: Optional[bool] = None       # per-channel alpha (folded into the preceding op); null: as `mode`
    scale_groups: list = field(default_factory=lambda: ["qkv", "o", "gate_up", "down"])
    rank: int = 4                       # low-rank correction B A (0: none)
    lora_alpha: float = 1.0             # the correction is (lora_alpha / rank) B A; the authors' LoRAQuantLinear keeps
                                        # its default lora_alpha=1 (quantize/int_linear_lora.py: scaling = lora_alpha / r);
                                        # lora_alpha=rank: the unscaled B A of earlier rqbench versions
    clip: bool = True                   # learnable weight clipping
    clip_init: float = 4.0              # sigmoid(4) = 0.982
    # --- weight-activation mode (W4A4): HF backend only
    act_bits: Optional[int] = None      # per-token dynamic activation fake-quant of every quantized linear's input; null: weight-only
    act_sym: bool = False               # the authors' activations are asymmetric
    qkv_quant: bool = True              # with act_bits: also q, k, v of the attention matmuls (per head and token,
                                        # asymmetric, after RoPE), as the authors' code; false: linear inputs only
    rotate: Optional[bool] = None       # offline residual rotation (QuaRot R1) before training; null: on iff act_bits
    # --- training
    epochs: Optional[int] = None        # total over the stages; null: 60 at 2 bits, else 20
    batch_size: int = 3                 # calibration rows per step (the authors' configs: 3)
    lr_scale: float = 1.0e-3
    lr_lowrank: Optional[float] = None  # null: 5e-4 weight-only (the authors' W2A16 / WXA16 config), 1e-4 with act_bits (W4A4)
    lr_clip: float = 1.0e-2
    lr_by_batch: bool = True            # lrs multiplied by batch_size (the authors' code)
    weight_decay: float = 0.0
    seed: int = 0
    offload: str = "auto"               # calibration activations: auto | cpu | device


@dataclass(frozen=True)
class Resolved:
    """The null ("as the authors' config for this setting") choices made concrete for one bit width."""
    mode: str
    scales: bool
    lr_lowrank: float
    epochs: int
    rotate: bool


MODES = ("lora_only", "slider")


def resolve(cfg: SliderQuantConfig, spec: QuantSpec) -> Resolved:
    # configs/llama2-7b-w2a16/config.yaml: quant_mode lora_only, scale_lr 0, lora_lr 5e-4 ("lora_only is for WXA16");
    # configs/llama2-7b-w4a4/config.yaml: quant_mode slider, scale_lr 1e-3, lora_lr 1e-4. No W3/W4A16 config exists:
    # weight-only settings take the WXA16 one.
    weight_only = cfg.act_bits is None
    mode = cfg.mode or ("lora_only" if weight_only else "slider")
    return Resolved(mode=mode, scales=cfg.scales if cfg.scales is not None else mode == "slider",
                    lr_lowrank=cfg.lr_lowrank if cfg.lr_lowrank is not None else (5.0e-4 if weight_only else 1.0e-4),
                    epochs=cfg.epochs if cfg.epochs is not None else (60 if spec.bits == 2 else 20),
                    rotate=cfg.rotate if cfg.rotate is not None else cfg.act_bits is not None)


def check_config(cfg: SliderQuantConfig) -> None:
    checks = [("shallow", cfg.shallow >= 0, "an integer >= 0"), ("deep", cfg.deep >= 0, "an integer >= 0"),
              ("window_size", cfg.window_size >= 1, "an integer >= 1"),
              ("stride", 1 <= cfg.stride <= cfg.window_size, "an integer in [1, window_size]"),
              ("gamma", 0 < cfg.gamma <= 1, "(0, 1]"), ("rank", cfg.rank >= 0, "an integer >= 0"),
              ("mode", cfg.mode is None or cfg.mode in MODES, "null, " + ", ".join(MODES)),
              ("lora_alpha", cfg.lora_alpha > 0, "> 0"),
              ("epochs", cfg.epochs is None or cfg.epochs >= 0, "null or an integer >= 0"),
              ("batch_size", cfg.batch_size >= 1, "an integer >= 1"),
              ("lr_scale", cfg.lr_scale >= 0, ">= 0"),
              ("lr_lowrank", cfg.lr_lowrank is None or cfg.lr_lowrank >= 0, "null or >= 0"),
              ("act_bits", cfg.act_bits is None or 2 <= cfg.act_bits <= 8, "null (weight-only) or 2..8"),
              # false without act_bits would change nothing but the run's identity: refused, so that one
              # computation has one configuration
              ("qkv_quant", isinstance(cfg.qkv_quant, bool) and (cfg.qkv_quant or cfg.act_bits is not None),
               "true, or false with act_bits set (weight-only runs quantize no activations)"),
              ("lr_clip", cfg.lr_clip >= 0, ">= 0"), ("weight_decay", cfg.weight_decay >= 0, ">= 0"),
              ("offload", cfg.offload in ("auto", "cpu", "device"), "auto, cpu, device")]
    check_values("method", cfg, checks)
    bad = [g for g in cfg.scale_groups if g not in GROUP_NAMES]
    if bad:
        raise UserError(f"method.scale_groups contains {bad!r}; allowed: {', '.join(GROUP_NAMES)}")
    if cfg.windows is not None:
        parse_windows(cfg.windows)


# ------------------------------------------------------------------ the window schedule

def window_schedule(n_layers: int, shallow: int = 4, deep: int = 4, size: int = 2, stride: int = 1) -> list[tuple[int, int]]:
    """[start, stop) windows: expanding over the shallow layers, size/stride in the middle, shrinking over the deep.

    The middle windows start at the last shallow layer and end at the first deep layer (one layer of
    overlap each side). With fewer layers than L_s + L_d the regions overlap: repeated windows are dropped
    (4 layers, defaults: [0], [0,1], [0..2], [0..3], [1..3], [2,3], [3]).
    """
    L = n_layers
    ls, ld = min(shallow, L), min(deep, L)
    out = [(0, i + 1) for i in range(ls)]
    first = ls - 1 if ls else 0
    last = L - ld if ld else L - 1           # last layer the middle windows must cover
    a = first
    while a <= last and (not out or out[-1][1] <= last):
        out.append((a, min(a + size, last + 1)))
        a += stride
    out += [(i, L) for i in range(L - ld, L)]
    clean = []
    for w in out:           # drop repeats and windows that would step back (tiny models)
        if not clean or w > clean[-1]:
            clean.append(w)
    return clean


def parse_windows(text: str, n_layers: Optional[int] = None) -> list[tuple[int, int]]:
    """'0-3,2-5,6' (inclusive layer ranges) -> [(0, 4), (2, 6), (6, 7)]; validated against n_layers if given."""
    out = []
    for part in str(text).replace(" ", "").split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise UserError(f"method.windows={text!r}: {part!r} is not a layer range; allowed: 'a-b' or 'a' "
                            f"(inclusive), comma-separated, e.g. '0-3,2-5,4-7'")
        a = int(m.group(1))
        out.append((a, int(m.group(2) if m.group(2) is not None else a) + 1))
    if n_layers is not None:
        try:
            _check_windows(out, n_layers)
        except ValueError as e:
            raise UserError(f"method.windows={text!r}: {e}") from None
    return out


def format_windows(windows: list[tuple[int, int]]) -> str:
    return ",".join(f"{a}" if b - a == 1 else f"{a}-{b - 1}" for a, b in windows)


# ------------------------------------------------------------------ the learnable fake-quant linear

def lwc_range(w: torch.Tensor, spec: QuantSpec, up: Optional[torch.Tensor], low: Optional[torch.Tensor]):
    """(scale, zero) per (row, group) with learnable clipping: max * sigmoid(up), min * sigmoid(low)."""
    wg = _grouped(w, spec.group_size)
    xmin, xmax = wg.amin(-1), wg.amax(-1)
    if up is not None:
        xmax = xmax * torch.sigmoid(up)
        xmin = xmin * torch.sigmoid(low)
    return qparams_from_range(xmin, xmax, spec)


class _SliderLinear(nn.Module):
    """A Linear that trains SliderQuant's parameters around its frozen full-precision weight."""

    def __init__(self, lin: nn.Linear, spec: QuantSpec, cfg: SliderQuantConfig, gen: torch.Generator,
                 act: Optional[ActSpec] = None):
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.weight = lin.weight            # the original parameter, frozen
        self.weight.requires_grad_(False)
        self.bias = lin.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.spec = spec
        dev = lin.weight.device
        if cfg.rank:
            a = torch.empty(cfg.rank, self.in_features)
            bound = 1 / math.sqrt(self.in_features)     # kaiming_uniform_(a=sqrt(5)) on [r, in]
            a.uniform_(-bound, bound, generator=gen)
            self.lora_a = nn.Parameter(a.to(dev))
            self.lora_b = nn.Parameter(torch.zeros(self.out_features, cfg.rank, device=dev))
            self.lora_scaling = cfg.lora_alpha / cfg.rank
        else:
            self.lora_a = self.lora_b = None
        if cfg.clip:
            ng = 1 if spec.group_size <= 0 else self.in_features // spec.group_size
            self.clip_up = nn.Parameter(torch.full((self.out_features, ng), cfg.clip_init, device=dev))
            self.clip_low = nn.Parameter(torch.full((self.out_features, ng), cfg.clip_init, device=dev))
        else:
            self.clip_up = self.clip_low = None
        self.act = act              # per-token input fake-quant (W4A4 mode), applied after the 1/alpha scaling
        self.quant = True
        self.fp = False             # True: the original linear (the full-precision teacher)
        self.gamma = 1.0
        self._alpha: Optional[tuple[nn.ParameterDict, str, Optional[torch.Tensor]]] = None

    def set_alpha(self, holder: nn.ParameterDict, key: str, expand: Optional[torch.Tensor]) -> None:
        self._alpha = (holder, key, expand)

    def alpha_cols(self) -> Optional[torch.Tensor]:
        if self._alpha is None:
            return None
        holder, key, expand = self._alpha
        a = holder[key]
        return a if expand is None else a[expand.to(a.device)]

    def effective_weight(self) -> torch.Tensor:
        """W * alpha + (lora_alpha / r) B A in float32 (before quantization)."""
        w = self.weight.float()
        cols = self.alpha_cols()
        if cols is not None:
            w = w * cols
        if self.lora_a is not None:
            w = w + (self.lora_b @ self.lora_a) * self.lora_scaling
        return w

    def grid(self, w: torch.Tensor):
        return lwc_range(w, self.spec, self.clip_up, self.clip_low)

    def forward(self, x):
        if self.fp:
            return F.linear(x, self.weight, self.bias)
        w = self.effective_weight()
        if self.quant:
            scale, zero = self.grid(w)
            wq = fake_quantize_ste(w, scale, zero, self.spec)
            if self.gamma < 1:
                k = min(self.in_features, math.ceil(self.gamma * self.in_features))
                wq = torch.cat([wq[:, :k], w[:, k:]], dim=1)
            w = wq
        cols = self.alpha_cols()
        if cols is not None:
            x = x / cols.to(x.dtype)
        if self.quant and self.act is not None:
            x = fake_quantize_tokens(x, self.act, self.gamma)
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"lowrank": [p for p in (self.lora_a, self.lora_b) if p is not None],
                "clip": [p for p in (self.clip_up, self.clip_low) if p is not None]}


@contextmanager
def _teacher(wrappers: list[_SliderLinear], attention: list):
    """The wrapped linears compute as the original full-precision ones inside the block, and the attention's
    q, k, v (actquant.QKVQuant states) are not quantized."""
    for w in wrappers:
        w.fp = True
    for a in attention:
        a.active = False
    try:
        yield
    finally:
        for w in wrappers:
            w.fp = False
        for a in attention:
            a.active = True


def _cast_layer(layer: nn.Module, dtype: torch.dtype, keep: set) -> torch.dtype:
    """Cast a layer's floating parameters and buffers to dtype, except the learnable ones (kept float32).

    Returns the dtype the layer had (that of its first non-learnable floating parameter)."""
    before = None
    for p in layer.parameters():
        if id(p) in keep or not p.is_floating_point():
            continue
        before = before or p.dtype
        if p.dtype != dtype:
            p.data = p.data.to(dtype)
    for mod in layer.modules():
        for k, b in list(mod._buffers.items()):
            if b is not None and b.is_floating_point() and b.dtype != dtype:
                mod._buffers[k] = b.to(dtype)
    return before or dtype


def _set(root: nn.Module, name: str, mod: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, mod)


# ------------------------------------------------------------------ the method

@register_method("sliderquant")
class SliderQuant:
    layerwise = True            # walks the decoder on the runner: the pipeline keeps the model on CPU meanwhile
    Config = SliderQuantConfig
    quantizes = True
    uses_calibration = True

    def __init__(self, cfg: SliderQuantConfig):
        check_config(cfg)
        self.cfg = cfg

    def rotates(self, spec: QuantSpec) -> bool:
        """Whether this run rotates the residual stream (checked against the family before loading)."""
        return resolve(self.cfg, spec).rotate

    @property
    def act_spec(self) -> Optional[ActSpec]:
        """Set in weight-activation mode: the pipeline then refuses backends that cannot fake-quantize activations."""
        return None if self.cfg.act_bits is None else ActSpec(self.cfg.act_bits, self.cfg.act_sym)

    @property
    def qkv_spec(self) -> Optional[ActSpec]:
        """The attention q/k/v spec: the authors' main.py q/k/v_quant_params (n_bits abits, symmetric False)."""
        return ActSpec(self.cfg.act_bits, sym=False) if self.cfg.act_bits is not None and self.cfg.qkv_quant else None

    def schedule(self, n_layers: int) -> list[tuple[int, int]]:
        c = self.cfg
        if c.windows is not None:
            return parse_windows(c.windows, n_layers)
        return window_schedule(n_layers, c.shallow, c.deep, c.window_size, c.stride)

    def state_file(self, model, ctx: QuantContext, ids: torch.Tensor) -> StateFile:
        """Where training progress is saved after every window (keyed by everything that determines it)."""
        from harness.quant.finetune_signal import weights_fingerprint
        from harness.store import stable_hash
        key = {"method": dataclasses.asdict(self.cfg), "quant": dataclasses.asdict(ctx.spec),
               "calib": hashlib.sha256(ids.cpu().contiguous().numpy().tobytes()).hexdigest()[:16],
               "model": weights_fingerprint((n, p) for n, p in model.state_dict().items())}
        if ctx.cache_dir is None:
            return StateFile(None, key)
        return StateFile(Path(ctx.cache_dir).expanduser() / "sliderquant" / "train" / f"{stable_hash(key)}.pt", key)

    def quantize(self, model, ctx: QuantContext, *, stop_after: Optional[int] = None) -> QuantResult:
        """`stop_after`: leave (TrainingStopped) once that many windows have trained in this call, their
        state saved, as a preempted job would; a later call with the same inputs resumes from there."""
        cfg, spec = self.cfg, ctx.spec
        self.eff = eff = resolve(cfg, spec)
        self.fam = arch.check_method(model, "sliderquant", rotate=eff.rotate)
        self._config, self._folds, self._skipped = model.config, {}, {}
        ids = ctx.calibration_ids()
        self._state = self.state_file(model, ctx, ids)
        saved = self._state.load()
        self._done = {tuple(d) for d in saved["done"]} if saved else set()     # (stage, window index)
        self._saved_params = saved["params"] if saved else {}
        self._stop_after, self._trained_here = stop_after, 0
        if eff.rotate:              # before the runner captures anything: calibration sees the rotated model
            rotate_model(model, seed=cfg.seed, device=ctx.device)
        self._attn: dict[int, tuple[str, actquant.QKVQuant]] = {}       # layer -> (attention module, its q/k/v state)
        if self.qkv_spec is not None:
            actquant.route_attention(model)
        runner = LayerwiseRunner(model, ids, ctx.device, batch_tokens=cfg.batch_size * ids.shape[1],
                                 offload=cfg.offload, progress=ctx.progress, desc="sliderquant")
        n = len(runner.layers)
        windows = self.schedule(n)
        if ctx.progress:
            print(f"sliderquant: {len(windows)} windows over {n} layers: {format_windows(windows)}")
        epochs = eff.epochs
        gammas = [cfg.gamma, 1.0] if cfg.gamma < 1 else [1.0]
        per_stage = -(-epochs // len(gammas))        # total split over the stages, rounded up
        self._wrapped: dict[int, dict[str, _SliderLinear]] = {}
        self._scales: dict[int, nn.ParameterDict] = {}
        self._gen = torch.Generator().manual_seed(cfg.seed)
        result = QuantResult(info={"windows": format_windows(windows), "epochs_per_stage": per_stage,
                                   "stages": gammas, "mode": eff.mode, "scales": eff.scales, "lr_lowrank": eff.lr_lowrank,
                                   "rotated": eff.rotate, "loss": saved["loss"] if saved else [],
                                   "resumed_windows": len(self._done)})
        resume_stage = max((st for st, _ in self._done), default=0)
        runner.capture()
        h0 = list(runner.hidden)
        try:
            for stage, gamma in enumerate(gammas):
                if stage < resume_stage:        # finished before the interruption: its result is the saved params
                    continue
                runner.hidden = list(h0)
                self._fp_hidden = list(h0)
                self._gamma = gamma
                for layer_wrappers in self._wrapped.values():
                    for w in layer_wrappers.values():
                        w.gamma = gamma
                for _, state in self._attn.values():
                    state.gamma = gamma
                runner.run(lambda win: self._train_window(win, windows, spec, per_stage, stage, result), windows)
            self._fp_hidden = []
            self._finalize(runner, spec, result)
            result.info["skipped"] = dict(self._skipped)
            if self.act_spec is not None:
                result.activations = {**self.act_spec.to_dict(), "targets": sorted(result.layers)}
            if self.qkv_spec is not None:
                for _, state in self._attn.values():        # the quantized model: every stage done
                    state.gamma, state.active = 1.0, True
                result.activations["attention"] = {**self.qkv_spec.to_dict(),
                                                   "targets": sorted(name for name, _ in self._attn.values())}
            self._state.remove()
        finally:
            self._fp_hidden = []
        return result

    # -------------------------------------------------------------- wrapping a layer

    def _wrap_layer(self, index: int, prefix: str, layer: nn.Module, spec: QuantSpec) -> None:
        cfg = self.cfg
        wrapped = {}
        for name, mod in list(layer.named_modules()):
            full = f"{prefix}.{name}"
            if isinstance(mod, nn.Linear) and any(re.search(p, full) for p in cfg.include) \
                    and not any(re.search(p, full) for p in cfg.exclude):
                spec.check_width(full, mod.in_features)
                w = _SliderLinear(mod, spec, cfg, self._gen, self.act_spec)
                _set(layer, name, w)
                wrapped[name] = w
        holder = nn.ParameterDict()
        if self.eff.scales:
            # The scale groups are the descriptor's folds (harness/arch.py); the wrapped linears are now in place.
            for f in arch.layer_folds(self.fam, layer):
                if f.name not in cfg.scale_groups:
                    continue
                if f.per_expert or not all(n in wrapped for n in f.linears):
                    self._skipped[f"{prefix}.{f.name}"] = "its linears are not all quantized here"
                    continue
                lins = [wrapped[n] for n in f.linears]
                width = folding.channels(layer, f, self._config)[0]
                expand = None
                if f.gqa_pair:
                    expand = folding.gqa_expand(self._config, width, lins[0].in_features)
                    if expand is not None:
                        expand = expand.to(lins[0].weight.device)
                holder[f.name] = nn.Parameter(torch.ones(width, device=lins[0].weight.device))
                self._folds[(index, f.name)] = f         # per layer: hybrid stacks differ by layer
                for lin in lins:
                    lin.set_alpha(holder, f.name, expand)
        layer.sliderquant_scales = holder          # moves with the layer; removed by _finalize
        for w in wrapped.values():
            w.gamma = self._gamma
        rel = arch.attention_of(self.fam, layer) if self.qkv_spec is not None and wrapped else None
        if rel is not None:
            self._attn[index] = (f"{prefix}.{rel}",
                                 actquant.quantize_qkv(layer.get_submodule(rel), self.qkv_spec, self._gamma))
        self._wrapped[index] = wrapped
        self._scales[index] = holder
        if index in self._saved_params:             # resuming: what this layer had learned so far
            with torch.no_grad():
                for name, p in self._named_learnable(index).items():
                    p.copy_(self._saved_params[index][name].to(p.device, p.dtype))

    def _named_learnable(self, i: int) -> dict[str, nn.Parameter]:
        out = {f"scale.{k}": p for k, p in self._scales[i].items()}
        for lname, w in self._wrapped[i].items():
            for attr in ("lora_a", "lora_b", "clip_up", "clip_low"):
                if getattr(w, attr) is not None:
                    out[f"{lname}.{attr}"] = getattr(w, attr)
        return out

    def _save_progress(self, stage: int, win, result: QuantResult) -> None:
        self._done.add((stage, win.index))
        self._state.save({"done": sorted(self._done), "loss": result.info["loss"],
                          "params": {i: {n: p.detach().cpu().clone() for n, p in self._named_learnable(i).items()}
                                     for i in self._wrapped}})
        self._trained_here += 1
        if self._stop_after is not None and self._trained_here >= self._stop_after:
            raise TrainingStopped(f"sliderquant stopped after window {win.start}-{win.stop - 1} of stage {stage} "
                                  f"(state saved in {self._state.path})")

    # -------------------------------------------------------------- one window

    def _train_window(self, win, windows, spec, epochs, stage, result) -> None:
        cfg = self.cfg
        for i, prefix, layer in zip(range(win.start, win.stop), win.prefixes, win.layers):
            if i not in self._wrapped:
                self._wrap_layer(i, prefix, layer, spec)
        wrappers = [w for i in range(win.start, win.stop) for w in self._wrapped[i].values()]
        runner = win.runner
        nxt = windows[win.index + 1][0] if win.index + 1 < len(windows) else win.stop
        advance = nxt - win.start
        learnable = {id(p) for i in range(win.start, win.stop) for p in self._named_learnable(i).values()}
        dtypes = [_cast_layer(layer, torch.float32, learnable) for layer in win.layers]

        def run(h, kws, layers=win.layers):
            outs = []
            for layer, kw in zip(layers, kws):
                h = _first_tensor(layer(h, **kw))
                outs.append(h)
            return outs

        # A window trained before an interruption replays: its layers already hold their saved parameters,
        # so the runner passes the quantized trajectory on exactly as it did; only the fp one needs advancing.
        replay = (stage, win.index) in self._done
        depth = advance if replay else len(win.layers)
        # Full-precision targets (fp inputs through the original layers) and the next window's fp inputs.
        targets, next_fp = [], []
        if depth:
            attention = [self._attn[i][1] for i in range(win.start, win.stop) if i in self._attn]
            with torch.no_grad(), _teacher(wrappers, attention):
                for b, (_, kws) in enumerate(win.batches()):
                    outs = run(self._fp_hidden[b].to(win.device).float(), kws[:depth], win.layers[:depth])
                    if not replay:
                        targets.append(outs[-1].to(runner.store_device))
                    if advance > 0:
                        next_fp.append(outs[advance - 1].to(runner.store_device, self._fp_hidden[b].dtype))
        if advance > 0:
            self._fp_hidden = next_fp
        if replay:
            for layer, dt in zip(win.layers, dtypes):
                _cast_layer(layer, dt, learnable)
            return

        n_batches = len(runner.hidden)

        def batch(b):
            kws = [runner.layer_kwargs(i, b, win.device) for i in range(win.start, win.stop)]
            return runner.hidden[b].to(win.device).float(), kws

        def window_loss() -> float:
            with torch.no_grad():
                tot = 0.0
                for b in range(n_batches):
                    h, kws = batch(b)
                    tot += float(F.mse_loss(run(h, kws)[-1], targets[b].to(win.device)))
                return tot / n_batches

        init = window_loss()
        params = {"scale": [p for i in range(win.start, win.stop) for p in self._scales[i].parameters()],
                  "lowrank": [p for w in wrappers for p in w.param_groups()["lowrank"]],
                  "clip": [p for w in wrappers for p in w.param_groups()["clip"]]}
        factor = cfg.batch_size if cfg.lr_by_batch else 1
        lrs = {"scale": cfg.lr_scale, "lowrank": self.eff.lr_lowrank, "clip": cfg.lr_clip}
        groups = [{"params": ps, "lr": lrs[k] * factor, "weight_decay": cfg.weight_decay}
                  for k, ps in params.items() if ps and lrs[k] > 0]
        steps = epochs * n_batches
        if groups and steps:
            frozen = [p for layer in win.layers for p in layer.parameters()
                      if p.requires_grad and id(p) not in learnable]        # norms: no gradients wanted
            for p in frozen:
                p.requires_grad_(False)
            for g in groups:
                for p in g["params"]:
                    p.requires_grad_(True)
            opt = torch.optim.AdamW(groups)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(0, steps, "linear"))     # the authors: linear, no warm-up
            order_gen = torch.Generator().manual_seed(cfg.seed * 1000003 + stage * 1009 + win.index)
            with torch.enable_grad():
                for _ in range(epochs):
                    for b in torch.randperm(n_batches, generator=order_gen).tolist():
                        h, kws = batch(b)
                        loss = F.mse_loss(run(h, kws)[-1], targets[b].to(win.device))
                        if not torch.isfinite(loss):
                            raise RuntimeError(f"sliderquant: non-finite loss in window {win.start}-{win.stop - 1}")
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                        sched.step()
            for g in groups:
                for p in g["params"]:
                    p.requires_grad_(False)
                    p.grad = None
            for p in frozen:
                p.requires_grad_(True)
            del opt
        final = window_loss()
        result.info["loss"].append({"stage": stage, "window": f"{win.start}-{win.stop - 1}",
                                    "init": init, "final": final})
        targets.clear()
        for layer, dt in zip(win.layers, dtypes):
            _cast_layer(layer, dt, learnable)
        self._save_progress(stage, win, result)

    # -------------------------------------------------------------- folding and quantizing

    @torch.no_grad()
    def _finalize(self, runner, spec: QuantSpec, result: QuantResult) -> None:
        for i in sorted(self._wrapped):
            layer = runner.layers[i]
            with on_device(layer, runner.device):       # fold and quantize on the accelerator, one layer at a time
                self._finalize_layer(runner, i, layer, self._wrapped.pop(i), spec, result)
            self._scales.pop(i)

    def _finalize_layer(self, runner, i, layer, wrapped, spec, result) -> None:
        """Fold 1/alpha into the preceding ops, quantize W * alpha + (lora_alpha / r) B A on the learned grid, swap in nn.Linear."""
        prefix = f"{runner.layers_name}.{i}"
        holder = self._scales[i]
        modules = dict(layer.named_modules())
        eff = {n: w.effective_weight() for n, w in wrapped.items()}
        for gname, alpha in holder.items():          # 1/alpha into the op before the group
            f = self._folds[(i, gname)]
            prev = modules[f.prev]
            rows = arch.fold_rows(f, prev, self._config)   # phi3: the v rows of qkv_proj, the up rows of gate_up
            a = alpha.detach().float()
            if isinstance(prev, _SliderLinear):
                r = rows or slice(None)
                eff[f.prev][r] = eff[f.prev][r] / a[:, None].to(eff[f.prev].device)
                if prev.bias is not None:
                    prev.bias.data[r] = (prev.bias.data[r].float() / a.to(prev.bias.device)).to(prev.bias.dtype)
            else:
                folding.divide_outputs(prev, a, rows, self.fam.norm_offset)
        for name, w in wrapped.items():
            we = eff[name]
            scale, zero = w.grid(we)
            dtype = w.weight.dtype
            q, deq = quantize_weight(we, spec, scale=scale.to(dtype).float(), zero=zero)
            del we, eff[name]
            # The plain Linear takes over the original parameters (no second copy of the weights).
            lin = nn.Linear(w.in_features, w.out_features, bias=w.bias is not None, device="meta")
            w.weight.data.copy_(deq.to(dtype))
            lin.weight = w.weight
            lin.weight.requires_grad_(True)
            if w.bias is not None:
                lin.bias = w.bias
                lin.bias.requires_grad_(True)
            _set(layer, name, lin)
            result.layers[f"{prefix}.{name}"] = QuantizedLinear(
                codes=q.codes.cpu(), scale=q.scale.cpu(), zero=q.zero.cpu(), bits=q.bits,
                group_size=q.group_size, sym=q.sym)
        del layer.sliderquant_scales


__all__ = ["SliderQuant", "SliderQuantConfig", "window_schedule", "parse_windows", "format_windows", "lwc_range"]
