"""AWQ (Lin et al., 2024): activation-aware per-input-channel scaling, then a clipping search.

For each *scale group* of a decoder layer — linears that read the output of the same preceding op —
AWQ searches a per-channel scale s = importance^r (r on a grid of 20 ratios in [0, 1), optionally
normalised so that sqrt(max·min) = 1) minimising the output error of the block that consumes the
group, ‖f(x; Q(W·s)/s) − f(x; W)‖². The best s is folded into the preceding op (norm weight or
linear rows divided by s, the group's weight columns multiplied by s), so the model keeps its plain
architecture and computes the same function before quantization. A per-group clip ratio is then
searched on the scaled weights (minimising each group's partial-output error on a token subsample)
and the weights are quantized on the shared quantizer's grid.

Scale groups of a Llama/Qwen decoder layer:
  qkv     input_layernorm           -> q_proj, k_proj, v_proj   (error measured on self_attn's output)
  o       v_proj                    -> o_proj                   (on o_proj; GQA: one scale per kv channel,
                                                                 shared by the query heads that read it)
  gate_up post_attention_layernorm  -> gate_proj, up_proj       (on the MLP's output)
  down    up_proj                   -> down_proj                (on down_proj)

`search_scale` is the reusable piece: it takes any importance vector, so QuantLRM plugs its
weight-update importance into the same search (and picks the groups via `groups`).
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn

from harness.quant.context import MethodConfig, QuantContext
from harness.quant.quantizer import QuantSpec, compute_qparams, quantize_weight
from harness.quant.runner import LayerwiseRunner, record_calls, record_inputs, tokens_of
from harness.registry import register_method
from harness.types import check_values, QuantizedLinear, QuantResult, UserError


# ------------------------------------------------------------------ scale groups

@dataclass(frozen=True)
class ScaleGroup:
    name: str
    prev: str                       # module (relative to the decoder layer) whose output the linears read
    linears: tuple[str, ...]        # relative names
    inspect: str                    # module whose output measures the error


SCALE_GROUPS = {
    "qkv": ScaleGroup("qkv", "input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                      "self_attn"),
    "o": ScaleGroup("o", "self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"),
    "gate_up": ScaleGroup("gate_up", "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    "down": ScaleGroup("down", "mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
}


@dataclass
class AWQConfig(MethodConfig):
    groups: list = field(default_factory=lambda: ["qkv", "o", "gate_up", "down"])
    grid: int = 20                          # ratios r = i / grid, i = 0..grid-1
    normalize_scales: bool = True           # s / sqrt(max(s) min(s))
    duo_scaling: bool = False               # s = x^r / w^(1-r) (AutoAWQ / llm-compressor) instead of x^r
    clip: bool = True                       # per-group clip search after scaling
    clip_grid: int = 20
    clip_max_shrink: float = 0.5            # ratios 1, 1 - 1/clip_grid, ... down to 1 - max_shrink (exclusive)
    clip_tokens: int = 512                  # tokens (evenly strided) used by the clip search
    clip_skip: list = field(default_factory=lambda: [r"q_proj$", r"k_proj$"])   # q·k: error not local
    batch_tokens: int = 8192
    offload: str = "auto"


def check_config(cfg: AWQConfig) -> None:
    bad = [g for g in cfg.groups if g not in SCALE_GROUPS]
    if bad:
        raise UserError(f"method.groups contains {bad!r}; allowed: {', '.join(SCALE_GROUPS)}")
    checks = [("grid", cfg.grid >= 1, "an integer >= 1"), ("clip_grid", cfg.clip_grid >= 1, "an integer >= 1"),
              ("clip_max_shrink", 0 <= cfg.clip_max_shrink < 1, "[0, 1)"),
              ("clip_tokens", cfg.clip_tokens >= 1, "an integer >= 1"),
              ("batch_tokens", cfg.batch_tokens >= 1, "an integer >= 1"),
              ("offload", cfg.offload in ("auto", "cpu", "device"), "auto, cpu, device")]
    check_values("method", cfg, checks)


# ------------------------------------------------------------------ the reusable scale search

@dataclass
class ScaleSearch:
    scale: torch.Tensor         # best per-channel scale, in the importance vector's space
    ratio: float
    loss: float
    base_loss: float            # loss at ratio 0 (s = 1: plain round-to-nearest)


def weight_mean(linears: list[nn.Linear], spec: QuantSpec) -> torch.Tensor:
    """Per input channel mean of |W| normalised by its quantization group's max (duo scaling)."""
    total, rows = 0, 0
    for lin in linears:
        w = lin.weight.detach().float().abs()
        out, inp = w.shape
        g = inp if spec.group_size <= 0 else spec.group_size
        w = w.reshape(out, inp // g, g)
        w = (w / (w.amax(-1, keepdim=True) + 1e-6)).reshape(out, inp)
        total = total + w.sum(0)
        rows += out
    return total / rows


def qdq(w: torch.Tensor, spec: QuantSpec, dtype: torch.dtype, clip_ratio=None) -> torch.Tensor:
    """Quantize-dequantize on the shared grid with the scale rounded to the checkpoint dtype (float32).

    Same arithmetic as the shared quantizer (round(w / s) + z, clamp, (q - z) · s), with the per-group
    scale broadcast over its group instead of expanded to the weight's shape.
    """
    scale, zero = compute_qparams(w, spec, clip_ratio=clip_ratio)
    s = scale.to(dtype).float().unsqueeze(-1)
    z = zero.unsqueeze(-1)
    out, inp = w.shape
    wg = w.float().reshape(out, scale.shape[1], inp // scale.shape[1])
    q = wg / s
    q.round_().add_(z).clamp_(0, spec.maxq).sub_(z).mul_(s)
    return q.reshape(out, inp)


class GramLoss:
    """Mean squared output error of a Linear from the Gram matrix of its inputs: mean((X ΔWᵀ)²) = Σ (ΔW G) ⊙ ΔW / (n·out).

    Exact (up to rounding) and cheaper than replaying the linear whenever in_features < tokens.
    """

    def __init__(self, inputs: list[torch.Tensor], lin: nn.Linear):
        self.g = None
        self.n = 0
        for x in inputs:
            t = tokens_of(x)
            self.g = t.T @ t if self.g is None else self.g.addmm_(t.T, t)
            self.n += t.shape[0]
        self.lin, self.w0 = lin, lin.weight.data.float().clone()

    def __call__(self) -> float:
        d = self.lin.weight.data.float() - self.w0
        return float(((d @ self.g) * d).sum()) / (self.n * d.shape[0])

    @staticmethod
    def worth_it(lin: nn.Linear, n_tokens: int, limit_bytes: int = 2 ** 31) -> bool:
        return lin.in_features < n_tokens and lin.in_features ** 2 * 4 <= limit_bytes


@torch.no_grad()
def search_scale(importance: torch.Tensor, linears: list[nn.Linear], evaluate: Callable[[], float],
                 spec: QuantSpec, *, grid: int = 20, normalize: bool = True,
                 expand: Optional[torch.Tensor] = None, duo_weight_mean: Optional[torch.Tensor] = None) -> ScaleSearch:
    """Grid search of s = importance^r (/ duo_weight_mean^(1-r)) for r in {0, 1/grid, ..., (grid-1)/grid}.

    importance: [C] non-negative, in the space of the preceding op's output channels.
    linears: the quantized linears reading those channels; their weights are temporarily replaced by
        Q(W·s)/s and restored before returning.
    evaluate(): the block error for the linears' current weights (lower is better).
    expand: optional index [in_features] mapping each linear input column to its channel in
        `importance` (GQA: o_proj columns -> v_proj channels).
    """
    dev = linears[0].weight.device
    imp = importance.detach().float().to(dev)
    wmean = None if duo_weight_mean is None else duo_weight_mean.detach().float().to(dev)
    originals = [lin.weight.data.clone() for lin in linears]
    best: Optional[ScaleSearch] = None
    base = None
    try:
        for i in range(grid):
            r = i / grid
            s = imp.pow(r)
            if wmean is not None:
                s = s / (wmean.pow(1 - r) + 1e-4)
            s = s.clamp(min=1e-4)
            if normalize:
                s = s / (s.max() * s.min()).sqrt()
            s = torch.where(torch.isfinite(s), s, torch.ones_like(s))
            cols = s if expand is None else s[expand]
            for lin, w0 in zip(linears, originals):
                wf = w0.float() * cols
                lin.weight.data.copy_((qdq(wf, spec, w0.dtype) / cols).to(w0.dtype))
            loss = float(evaluate())
            if base is None:
                base = loss
            if best is None or loss < best.loss:
                best = ScaleSearch(scale=s.clone(), ratio=r, loss=loss, base_loss=base)
    finally:
        for lin, w0 in zip(linears, originals):
            lin.weight.data.copy_(w0)
    if best is None or not torch.isfinite(torch.tensor(best.loss)):
        raise RuntimeError("awq: no finite loss in the scale search (NaNs in the block's forward?)")
    best.base_loss = base
    return best


# ------------------------------------------------------------------ folding

@torch.no_grad()
def fold_scale(prev: nn.Module, linears: list[nn.Linear], s: torch.Tensor, expand: Optional[torch.Tensor] = None):
    """prev's output channels /= s, the linears' input columns *= s: the block computes the same function."""
    s = s.float()
    cols = s if expand is None else s[expand]
    if isinstance(prev, nn.Linear):
        if prev.out_features != s.numel():
            raise ValueError(f"cannot fold a scale of {s.numel()} channels into a Linear with {prev.out_features} outputs")
        prev.weight.data.copy_((prev.weight.data.float() / s[:, None]).to(prev.weight.dtype))
        if prev.bias is not None:
            prev.bias.data.copy_((prev.bias.data.float() / s).to(prev.bias.dtype))
    else:
        w = getattr(prev, "weight", None)
        if w is None or w.shape != s.shape:
            raise ValueError(f"cannot fold a scale into {type(prev).__name__} (needs a per-channel weight)")
        if "gemma" in type(prev).__name__.lower():
            raise ValueError(f"{type(prev).__name__} scales by (1 + weight): folding is not supported")
        w.data.copy_((w.data.float() / s).to(w.dtype))
        b = getattr(prev, "bias", None)
        if isinstance(b, torch.Tensor):
            b.data.copy_((b.data.float() / s).to(b.dtype))
    for lin in linears:
        lin.weight.data.copy_((lin.weight.data.float() * cols).to(lin.weight.dtype))


def gqa_expand(attn: nn.Module, v: nn.Linear, o: nn.Linear) -> Optional[torch.Tensor]:
    """Index [o.in_features] -> v channel, or None when v and o line up one to one (no GQA)."""
    if v.out_features == o.in_features:
        return None
    head_dim = getattr(attn, "head_dim", None)
    if not head_dim or v.out_features % head_dim or o.in_features % v.out_features:
        raise ValueError(f"cannot map o_proj inputs ({o.in_features}) to v_proj outputs ({v.out_features})")
    kv = v.out_features // head_dim
    rep = o.in_features // v.out_features
    # o_proj input column (kv_head * rep + r) * head_dim + d reads v channel kv_head * head_dim + d
    idx = (torch.arange(kv)[:, None, None] * head_dim + torch.arange(head_dim)[None, None, :]).expand(kv, rep, head_dim)
    return idx.reshape(-1).to(v.weight.device)


# ------------------------------------------------------------------ clipping

@torch.no_grad()
def search_clip(w: torch.Tensor, x: torch.Tensor, spec: QuantSpec, *, grid: int = 20, max_shrink: float = 0.5,
                out_batch: int = 1024) -> torch.Tensor:
    """Per (row, group) clip ratio minimising the group's partial-output error on tokens x [n, in].

    The error of group g of row o is mean_t (x_tg · Δw_og)² = Δw_og G_g Δw_ogᵀ / n with G_g = X_gᵀ X_g,
    so each candidate costs one batched product with the per-group Gram matrices.
    """
    out, inp = w.shape
    g = inp if spec.group_size <= 0 else spec.group_size
    ng = inp // g
    xg = x.float().reshape(-1, ng, g).transpose(0, 1)              # [ng, n, g]
    gram = torch.bmm(xg.transpose(1, 2), xg) / xg.shape[1]        # [ng, g, g]
    ratios = [1 - i / grid for i in range(max(1, int(max_shrink * grid)))]
    best = torch.ones(out, ng, device=w.device)
    best_err = torch.full((out, ng), float("inf"), device=w.device)
    wf = w.float()
    for r in ratios:
        d = qdq(wf, spec, w.dtype, clip_ratio=r) - wf
        for o1 in range(0, out, out_batch):
            db = d[o1:o1 + out_batch].reshape(-1, ng, g).transpose(0, 1)     # [ng, ob, g]
            err = (torch.bmm(db, gram) * db).sum(-1).T                          # [ob, ng]
            cur = best_err[o1:o1 + out_batch]
            better = err < cur
            best_err[o1:o1 + out_batch] = torch.where(better, err, cur)
            best[o1:o1 + out_batch] = torch.where(better, torch.full_like(err, r), best[o1:o1 + out_batch])
    return best


# ------------------------------------------------------------------ the method

def _call_input(args, kwargs) -> torch.Tensor:
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    return next(v for v in kwargs.values() if isinstance(v, torch.Tensor))


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _replay(module: nn.Module, calls, refs) -> float:
    """Mean squared error of module's outputs on the recorded calls against the reference outputs."""
    total, count = 0.0, 0
    for (args, kwargs), ref in zip(calls, refs):
        out = _first(module(*args, **kwargs))
        total += float(torch.sum((out.float() - ref.float()) ** 2))
        count += ref.numel()
    return total / count


class _TokenSample:
    """Keeps every `step`-th token (global order) of the inputs it sees."""

    def __init__(self, step: int):
        self.step, self.seen, self.parts = step, 0, []

    def add(self, x: torch.Tensor) -> None:
        t = tokens_of(x)
        first = (-self.seen) % self.step
        self.parts.append(t[first::self.step])
        self.seen += t.shape[0]

    def tensor(self) -> torch.Tensor:
        return torch.cat(self.parts)


@register_method("awq")
class AWQ:
    layerwise = True            # walks the decoder on the runner: the pipeline keeps the model on CPU meanwhile
    Config = AWQConfig
    quantizes = True
    uses_calibration = True

    def __init__(self, cfg: AWQConfig):
        check_config(cfg)
        self.cfg = cfg

    def importance(self, win, group: ScaleGroup, x_abs_mean: torch.Tensor, linears: dict) -> torch.Tensor:
        """Per-channel importance of a scale group (AWQ: mean |activation|). QuantLRM overrides this."""
        return x_abs_mean

    @torch.no_grad()
    def quantize(self, model, ctx: QuantContext) -> QuantResult:
        ids = ctx.calibration_ids()          # before any weight changes (reasoning traces use the fp model)
        cfg, spec = self.cfg, ctx.spec
        result = QuantResult(info={"scales": {}})
        runner = LayerwiseRunner(model, ids, ctx.device, batch_tokens=cfg.batch_tokens, offload=cfg.offload,
                                 progress=ctx.progress, desc=self.name)
        clip_step = max(1, ids.numel() // cfg.clip_tokens)
        runner.run(lambda win: self.quantize_window(win, spec, clip_step, result))
        return result

    def quantize_window(self, win, spec: QuantSpec, clip_step: int, result: QuantResult) -> None:
        cfg = self.cfg
        selected = win.linears(cfg.include, cfg.exclude)
        if not selected:
            return
        for name, lin in selected.items():
            spec.check_width(name, lin.in_features)
        for prefix, layer in zip(win.prefixes, win.layers):
            mine = {n: m for n, m in selected.items() if n.startswith(prefix + ".")}
            if mine:
                self._quantize_layer(win, prefix, layer, mine, spec, clip_step, result)

    def _quantize_layer(self, win, prefix, layer, selected, spec, clip_step, result) -> None:
        cfg = self.cfg
        rel = {n[len(prefix) + 1:]: m for n, m in selected.items()}
        modules = dict(layer.named_modules())
        groups = []
        for gname in cfg.groups:
            g = SCALE_GROUPS[gname]
            lins = [rel[n] for n in g.linears if n in rel]
            if lins and g.prev in modules and g.inspect in modules:
                groups.append((g, lins))

        # One full-precision forward: calls of the inspected blocks, a token sample of every linear's input.
        calls = {g.name: [] for g, _ in groups}
        samples = {n: _TokenSample(clip_step) for n in rel}
        stack = [record_calls(modules[g.inspect], calls[g.name]) for g, _ in groups]
        stack.append(record_inputs(rel, lambda n, x: samples[n].add(x)))
        for cm in stack:
            cm.__enter__()
        try:
            # stop once every recorded module was reached: the layer's last linear need not compute
            win.forward(stop_before=[modules[g.inspect] for g, _ in groups] + list(rel.values()))
        finally:
            for cm in reversed(stack):
                cm.__exit__(None, None, None)

        # Scale search per group on the full-precision layer (AWQ searches all groups, then applies).
        found = []
        for g, lins in groups:
            block = modules[g.inspect]
            xs = [_call_input(a, k) for a, k in calls[g.name]]
            lone = isinstance(block, nn.Linear) and len(lins) == 1 and lins[0] is block
            refs = None if lone else [_first(block(*a, **k)) for a, k in calls[g.name]]
            abs_sum = sum(tokens_of(x).abs().sum(0) for x in xs)
            x_mean = abs_sum / sum(tokens_of(x).shape[0] for x in xs)
            prev = modules[g.prev]
            expand = gqa_expand(modules["self_attn"], prev, lins[0]) if g.name == "o" else None
            imp = self.importance(win, g, x_mean, {n: rel[n] for n in g.linears if n in rel})
            wmean = weight_mean(lins, spec) if cfg.duo_scaling else None
            if expand is not None:          # reduce to v channels: mean over the query heads sharing each
                imp = _reduce_to(imp, expand, prev.out_features)
                if wmean is not None:
                    wmean = _reduce_to(wmean, expand, prev.out_features)
            n_tokens = sum(tokens_of(x).shape[0] for x in xs)
            if lone and GramLoss.worth_it(block, n_tokens):
                evaluate = GramLoss(xs, block)           # a lone linear: same loss, from the Gram matrix
            else:
                if refs is None:
                    refs = [_first(block(*a, **k)) for a, k in calls[g.name]]
                evaluate = functools.partial(_replay, block, calls[g.name], refs)
            res = search_scale(imp, lins, evaluate, spec, grid=cfg.grid,
                               normalize=cfg.normalize_scales, expand=expand, duo_weight_mean=wmean)
            del evaluate
            found.append((g, lins, prev, res, expand))
            result.info["scales"][f"{prefix}.{g.name}"] = {"ratio": res.ratio, "loss": res.loss,
                                                           "rtn_loss": res.base_loss}
            del refs, xs
        calls.clear()
        for g, lins, prev, res, expand in found:
            fold_scale(prev, lins, res.scale, expand)
            cols = res.scale if expand is None else res.scale[expand]
            for rn in g.linears:
                if rn in samples:
                    samples[rn].parts = [p / cols for p in samples[rn].parts]

        # Clip search on the scaled weights, then quantize every selected linear of the layer.
        skip = [re.compile(p) for p in cfg.clip_skip]
        for rn, lin in rel.items():
            ratio = None
            if cfg.clip and not any(p.search(rn) for p in skip):
                ratio = search_clip(lin.weight.data, samples[rn].tensor(), spec, grid=cfg.clip_grid,
                                    max_shrink=cfg.clip_max_shrink)
            q, deq = _quantize(lin.weight.data, spec, ratio)
            lin.weight.data.copy_(deq)
            result.layers[f"{prefix}.{rn}"] = q
        samples.clear()


def _reduce_to(v: torch.Tensor, expand: torch.Tensor, n: int) -> torch.Tensor:
    out = torch.zeros(n, device=v.device, dtype=torch.float32).index_add_(0, expand, v.float())
    cnt = torch.zeros(n, device=v.device, dtype=torch.float32).index_add_(0, expand, torch.ones_like(v, dtype=torch.float32))
    return out / cnt


def _quantize(w: torch.Tensor, spec: QuantSpec, clip_ratio) -> tuple[QuantizedLinear, torch.Tensor]:
    """Codes on the shared grid (scale rounded to w's dtype); dequantized weight in w's dtype."""
    scale, zero = compute_qparams(w, spec, clip_ratio=clip_ratio)
    q, deq = quantize_weight(w, spec, scale=scale.to(w.dtype).float(), zero=zero)
    return QuantizedLinear(codes=q.codes.cpu(), scale=q.scale.cpu(), zero=q.zero.cpu(), bits=q.bits,
                           group_size=q.group_size, sym=q.sym), deq


__all__ = ["AWQ", "AWQConfig", "SCALE_GROUPS", "ScaleGroup", "ScaleSearch", "search_scale", "search_clip",
           "fold_scale", "gqa_expand", "weight_mean", "qdq", "GramLoss"]
