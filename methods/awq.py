"""AWQ (Lin et al., 2024): activation-aware per-input-channel scaling, then a clipping search.

For each *scale group* of a decoder layer — linears that read the output of the same preceding op —
AWQ searches a per-channel scale s = importance^r (r on a grid of 20 ratios in [0, 1), optionally
normalised so that sqrt(max·min) = 1) minimising the output error of the block that consumes the
group, ‖f(x; Q(W·s)/s) − f(x; W)‖². The best s is folded into the preceding op (norm weight or
linear rows divided by s, the group's weight columns multiplied by s), so the model keeps its plain
architecture and computes the same function before quantization. A per-group clip ratio is then
searched on the scaled weights (minimising each group's partial-output error on a token subsample)
and the weights are quantized on the shared quantizer's grid.

Scale groups come from the architecture descriptors (harness/arch.py: which norm or linear feeds which
linears, per family; fused phi3 projections by row slices; Gemma's (1 + w) norms; OLMo's post-norm layers
have only o and down; MoE: the post-attention norm feeds every expert's gate_up and the router). Llama/Qwen:
  qkv     input_layernorm           -> q_proj, k_proj, v_proj   (error measured on self_attn's output)
  o       v_proj                    -> o_proj                   (on o_proj; skipped under GQA by default)
  gate_up post_attention_layernorm  -> gate_proj, up_proj       (on the MLP's output)
  down    up_proj                   -> down_proj                (on down_proj)
Every group the descriptor has is searched or logged in QuantResult.info["skipped"] with the reason.

Defaults follow llm-awq (conf/method/awq.yaml names the file of each): scales and clips searched on the
full-precision model's activations (`search_inputs=fp`), v->o skipped when the shapes differ (GQA), clip
= clamp to ±(1 − i/20)·max|w| (`clip_mode=absmax`). Fused MoE experts: gate_up is scaled through the
norm (the router's columns too) and clipped on every token entering the experts (llm-compressor's
calibrate-all-experts); each expert's own up->down pair is searched and clipped on the tokens routed to it.

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
import torch.nn.functional as F

from harness.quant.context import MethodConfig, QuantContext
from harness import arch
from harness.quant import fold as folding
from harness.quant.quantizer import QuantSpec, compute_qparams, qparams_from_range, quantize_weight
from harness.quant.runner import LayerwiseRunner, record_calls, record_inputs, tokens_of, warn
from harness.registry import register_method
from harness.types import check_values, QuantizedLinear, QuantResult, UserError


# ------------------------------------------------------------------ scale groups

# The scale groups (which op feeds which linears, per family) are the architecture descriptors' folds
# (harness/arch.py); method.groups picks among these names.
GROUP_NAMES = ("qkv", "o", "gate_up", "down")
SEARCH_INPUTS = ("fp", "quantized")
GQA_O = ("skip", "shared", "per_head")
CLIP_MODES = ("absmax", "minmax")


@dataclass
class AWQConfig(MethodConfig):
    groups: Optional[list] = None           # null: every group the family's descriptor has (arch.py)
    search_inputs: str = "fp"               # fp: layer inputs from the full-precision model (llm-awq) | quantized
    gqa_o: str = "skip"                     # v->o when o reads v repeated (GQA): skip (llm-awq) | shared | per_head
    grid: int = 20                          # ratios r = i / grid, i = 0..grid-1
    normalize_scales: bool = True           # s / sqrt(max(s) min(s))
    duo_scaling: bool = False               # s = x^r / w^(1-r) (AutoAWQ / llm-compressor) instead of x^r
    clip: bool = True                       # per-group clip search after scaling
    clip_grid: int = 20
    clip_max_shrink: float = 0.5            # ratios 1, 1 - 1/clip_grid, ... down to 1 - max_shrink (exclusive)
    clip_mode: str = "absmax"               # absmax: clamp to ±r·max|w| (llm-awq) | minmax: min·r, max·r
    clip_tokens: int = 512                  # tokens (evenly strided) used by the clip search
    clip_skip: list = field(default_factory=lambda: [r"q_proj$", r"k_proj$"])   # q·k: error not local
    batch_tokens: int = 8192
    offload: str = "auto"


def check_config(cfg: AWQConfig) -> None:
    bad = [g for g in (cfg.groups or []) if g not in GROUP_NAMES]
    if bad:
        raise UserError(f"method.groups contains {bad!r}; allowed: {', '.join(GROUP_NAMES)} (or null: all)")
    checks = [("search_inputs", cfg.search_inputs in SEARCH_INPUTS, ", ".join(SEARCH_INPUTS)),
              ("gqa_o", cfg.gqa_o in GQA_O, ", ".join(GQA_O)),
              ("clip_mode", cfg.clip_mode in CLIP_MODES, ", ".join(CLIP_MODES)),
              ("grid", cfg.grid >= 1, "an integer >= 1"), ("clip_grid", cfg.clip_grid >= 1, "an integer >= 1"),
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


def clip_qparams(w: torch.Tensor, spec: QuantSpec, ratio=None, mode: str = "minmax"):
    """Per-group (scale, zero) with a clip ratio: minmax shrinks min and max by the ratio; absmax clamps the
    weights to ±ratio·max|w| first, then takes their min/max (llm-awq auto_clip.py: auto_clip_layer)."""
    if ratio is None or mode == "minmax":
        return compute_qparams(w, spec, clip_ratio=ratio)
    out, inp = w.shape
    g = inp if spec.group_size <= 0 else spec.group_size
    wg = w.float().reshape(out, inp // g, g)
    lim = wg.abs().amax(-1) * ratio
    return qparams_from_range(torch.maximum(wg.amin(-1), -lim), torch.minimum(wg.amax(-1), lim), spec)


def qdq(w: torch.Tensor, spec: QuantSpec, dtype: torch.dtype, clip_ratio=None, mode: str = "minmax") -> torch.Tensor:
    """Quantize-dequantize on the shared grid with the scale rounded to the checkpoint dtype (float32).

    Same arithmetic as the shared quantizer (round(w / s) + z, clamp, (q - z) · s), with the per-group
    scale broadcast over its group instead of expanded to the weight's shape.
    """
    scale, zero = clip_qparams(w, spec, clip_ratio, mode)
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

def fold_scale(prev: nn.Module, linears: list, s: torch.Tensor, expand: Optional[torch.Tensor] = None,
               norm_offset: float = 0.0):
    """prev's output channels /= s, the linears' input columns *= s: the block computes the same function.
    (harness.quant.fold does the arithmetic; methods fold through the descriptors with fold.apply.)"""
    folding.divide_outputs(prev, s, None, norm_offset)
    folding.multiply_inputs(linears, s, expand)


def gqa_expand(attn: nn.Module, v: nn.Linear, o: nn.Linear) -> Optional[torch.Tensor]:
    """Index [o.in_features] -> v channel, or None when v and o line up one to one (no GQA)."""
    idx = folding.gqa_expand(None, v.out_features, o.in_features, getattr(attn, "head_dim", None))
    return None if idx is None else idx.to(v.weight.device)


# ------------------------------------------------------------------ clipping

@torch.no_grad()
def search_clip(w: torch.Tensor, x: torch.Tensor, spec: QuantSpec, *, grid: int = 20, max_shrink: float = 0.5,
                out_batch: int = 1024, mode: str = "minmax") -> torch.Tensor:
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
        d = qdq(wf, spec, w.dtype, clip_ratio=r, mode=mode) - wf
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

    def importance(self, win, group: arch.Fold, x_abs_mean: torch.Tensor, linears: dict) -> torch.Tensor:
        """Per-channel importance of a scale group (AWQ: mean |activation|). QuantLRM overrides this."""
        return x_abs_mean

    def groups_for(self, fam: arch.Family) -> list[str]:
        """The scale groups searched on this family (method.groups; null: all the descriptor has)."""
        return list(self.cfg.groups) if self.cfg.groups is not None else fam.fold_names()

    @torch.no_grad()
    def quantize(self, model, ctx: QuantContext) -> QuantResult:
        ids = ctx.calibration_ids()          # before any weight changes (reasoning traces use the fp model)
        cfg, spec = self.cfg, ctx.spec
        self.fam = arch.check_method(model, self.name)
        self.config = model.config
        wanted = self.groups_for(self.fam)
        result = QuantResult(info={"scales": {}, "skipped": {}, "search_inputs": cfg.search_inputs})
        absent = [g for g in wanted if g not in self.fam.fold_names()]
        if absent:          # e.g. OLMo (post-norm): no norm feeds q/k/v or the MLP
            why = "post-norm: no norm feeds these linears" if self.fam.post_norm else "not in the descriptor"
            result.info["skipped"]["*"] = f"groups {absent} do not exist for model_type " \
                                          f"{model.config.model_type!r} ({why})"
            warn(f"{self.name}: {result.info['skipped']['*']}; searching {[g for g in wanted if g not in absent]}")
        self._wanted = wanted
        runner = LayerwiseRunner(model, ids, ctx.device, batch_tokens=cfg.batch_tokens, offload=cfg.offload,
                                 progress=ctx.progress, desc=self.name)
        clip_step = max(1, ids.numel() // cfg.clip_tokens)
        runner.run(lambda win: self.quantize_window(win, spec, clip_step, result), inputs=cfg.search_inputs)
        return result

    def quantize_window(self, win, spec: QuantSpec, clip_step: int, result: QuantResult) -> None:
        cfg = self.cfg
        selected = win.weights(cfg.include, cfg.exclude)
        if not selected:
            return
        for name, lin in selected.items():
            spec.check_width(name, lin.in_features)
        for prefix, layer in zip(win.prefixes, win.layers):
            mine = {n: m for n, m in selected.items() if n.startswith(prefix + ".")}
            if mine:
                self._quantize_layer(win, prefix, layer, mine, spec, clip_step, result)

    def _plan(self, prefix, layer, rel, result) -> list:
        """(fold, selected readers, GQA expand index, key) for every group searched in this layer; every other
        group of the descriptor is logged in result.info["skipped"] with the reason."""
        cfg, plan = self.cfg, []
        for i, f in enumerate(arch.layer_folds(self.fam, layer)):
            key = f"{prefix}.{f.name}" + ("" if f.when in (None, "self_attn", "linear_attn", "mlp.gate_proj",
                                                           "mlp.up_proj", "mlp.experts") else f"@{f.when}")
            if f.name not in self._wanted:
                continue
            lins = [rel[n] for n in f.linears if n in rel]
            if not lins:
                result.info["skipped"][key] = "none of its linears is selected"
                continue
            expand = None
            if f.gqa_pair:
                o = arch.resolve(layer, f.linears[0])
                v_ch = folding.channels(layer, f, self.config)[0]
                expand = folding.gqa_expand(self.config, v_ch, o.in_features)
                if expand is not None and cfg.gqa_o == "skip":
                    result.info["skipped"][key] = "v->o under GQA (shapes differ): skipped as llm-awq/AutoAWQ do"
                    continue
            plan.append((f, lins, expand, key))
        return plan

    def _quantize_layer(self, win, prefix, layer, selected, spec, clip_step, result) -> None:
        cfg = self.cfg
        rel = {n[len(prefix) + 1:]: m for n, m in selected.items()}
        plan = self._plan(prefix, layer, rel, result)

        # One forward of the layer (its weights still full precision): calls of the inspected blocks and a
        # token sample of every selected weight's input (expert gate_up: every token entering the experts,
        # as llm-compressor's calibrate-all-experts; expert down_proj: none, so no clip search).
        calls = {key: [] for *_, key in plan}
        hooked = {}
        for rn, m in rel.items():
            if isinstance(m, nn.Module):
                hooked[rn] = m
            elif rn.endswith("gate_up_proj"):
                hooked[rn] = arch.resolve(layer, rn.rpartition(".")[0])
        samples = {n: _TokenSample(clip_step) for n in hooked}
        stack = [record_calls(arch.resolve(layer, f.inspect), calls[key]) for f, _, _, key in plan]
        stack.append(record_inputs(hooked, lambda n, x: samples[n].add(x)))
        for cm in stack:
            cm.__enter__()
        try:
            stops = [arch.resolve(layer, f.inspect) for f, *_ in plan] + list(hooked.values())
            win.forward(stop_before=stops or None)
        finally:
            for cm in reversed(stack):
                cm.__exit__(None, None, None)

        # Scale search per group on the full-precision layer (AWQ searches all groups, then applies).
        found, expert_clip = [], {}
        for f, lins, expand, key in plan:
            if f.per_expert:
                res, xs = self._search_expert_pairs(layer, f, calls[key], spec, result, key)
                found.append((f, lins, res, None))
                expert_clip[f.linears[0]] = xs
                continue
            block = arch.resolve(layer, f.inspect)
            xs = [_call_input(a, k) for a, k in calls[key]]
            lone = isinstance(block, nn.Linear) and len(lins) == 1 and lins[0] is block
            refs = None if lone else [_first(block(*a, **k)) for a, k in calls[key]]
            abs_sum = sum(tokens_of(x).abs().sum(0) for x in xs)
            x_mean = abs_sum / sum(tokens_of(x).shape[0] for x in xs)
            n_prev = folding.channels(layer, f, self.config)[0]
            imp = self.importance(win, f, x_mean, {n: rel[n] for n in f.linears if n in rel})
            wmean = weight_mean(lins, spec) if cfg.duo_scaling else None
            search_expand = expand
            if expand is not None and cfg.gqa_o == "shared":    # one importance per v channel before the search
                imp = _reduce_to(imp, expand, n_prev)
                if wmean is not None:
                    wmean = _reduce_to(wmean, expand, n_prev)
            elif expand is not None:                             # per_head: search in o's input space
                search_expand = None
            n_tokens = sum(tokens_of(x).shape[0] for x in xs)
            if lone and GramLoss.worth_it(block, n_tokens):
                evaluate = GramLoss(xs, block)           # a lone linear: same loss, from the Gram matrix
            else:
                if refs is None:
                    refs = [_first(block(*a, **k)) for a, k in calls[key]]
                evaluate = functools.partial(_replay, block, calls[key], refs)
            res = search_scale(imp, lins, evaluate, spec, grid=cfg.grid, normalize=cfg.normalize_scales,
                               expand=search_expand, duo_weight_mean=wmean)
            if expand is not None and search_expand is None:     # QuantLRM's downsample_scales: mean over heads
                res.scale = _reduce_to(res.scale, expand, n_prev)
            del evaluate
            found.append((f, lins, res, expand))
            result.info["scales"][key] = {"ratio": res.ratio, "loss": res.loss, "rtn_loss": res.base_loss}
            del refs, xs
        calls.clear()
        for f, lins, res, expand in found:
            folding.apply(layer, self.fam, f, res.scale, self.config, expand)
            cols = res.scale if expand is None else res.scale[expand]
            for rn in f.linears:
                if rn in samples:
                    samples[rn].parts = [p / cols.to(p.device) for p in samples[rn].parts]
                if rn in expert_clip:               # per expert: its own routed inputs, scaled by its own s
                    expert_clip[rn] = {e: x[::clip_step] / cols[e].to(x.device) for e, x in expert_clip[rn].items()}

        # Clip search on the scaled weights, then quantize every selected weight of the layer.
        skip = [re.compile(p) for p in cfg.clip_skip]
        for rn, lin in rel.items():
            ratio = None
            if cfg.clip and rn in samples and not any(p.search(rn) for p in skip):
                ratio = search_clip(lin.weight.data, samples[rn].tensor(), spec, grid=cfg.clip_grid,
                                    max_shrink=cfg.clip_max_shrink, mode=cfg.clip_mode)
            elif cfg.clip and rn in expert_clip:
                ratio = self._expert_clip(lin, expert_clip[rn], spec)
            q, deq = _quantize(lin.weight.data, spec, ratio, cfg.clip_mode)
            lin.weight.data.copy_(deq)
            result.layers[f"{prefix}.{rn}"] = q
        samples.clear()


    def _search_expert_pairs(self, layer, f, calls, spec, result, key):
        """AWQ's search for each expert's own up->down pair, on the tokens the router sent to it: importance =
        mean |act(gate)·up| of those tokens, loss = its down slice's output error (GramLoss). Experts that got
        no token keep s = 1. Returns (ScaleSearch with scale [E, I], {expert: its down inputs})."""
        from types import SimpleNamespace
        cfg = self.cfg
        experts, gu, down = (arch.resolve(layer, n) for n in (f.inspect, f.prev, f.linears[0]))
        n_exp, _, inter = down.shape
        xs: dict[int, list] = {}
        for args, _kw in calls:
            x, idx = args[0].reshape(-1, args[0].shape[-1]), args[1]
            for e in torch.unique(idx).tolist():
                if e < n_exp:
                    gate, up = F.linear(x[(idx == e).any(-1)], gu[e]).chunk(2, dim=-1)
                    xs.setdefault(e, []).append((experts.act_fn(gate) * up).float())
        scale = torch.ones(n_exp, inter, device=down.device)
        ratios = {}
        for e, parts in xs.items():
            view = SimpleNamespace(weight=down.data[e], in_features=inter, out_features=down.shape[1], bias=None)
            imp = torch.cat(parts).abs().mean(0)
            wmean = weight_mean([view], spec) if cfg.duo_scaling else None
            res = search_scale(imp, [view], GramLoss(parts, view), spec, grid=cfg.grid,
                               normalize=cfg.normalize_scales, duo_weight_mean=wmean)
            scale[e] = res.scale
            ratios[e] = res.ratio
        result.info["scales"][key] = {"experts_searched": len(ratios), "experts": n_exp,
                                      "ratios": [ratios.get(e) for e in range(n_exp)]}
        return ScaleSearch(scale=scale, ratio=float("nan"), loss=float("nan"), base_loss=float("nan")), \
            {e: torch.cat(p) for e, p in xs.items()}

    def _expert_clip(self, mat, xs: dict, spec: QuantSpec) -> torch.Tensor:
        """Per expert clip ratios on its own routed inputs, stacked as the [E·out, groups] matrix; 1 without tokens."""
        cfg = self.cfg
        rows, inp = mat.rows_per_expert, mat.in_features
        ng = 1 if spec.group_size <= 0 else inp // spec.group_size
        out = torch.ones(mat.experts * rows, ng, device=mat.weight.device)
        for e, x in xs.items():
            out[e * rows:(e + 1) * rows] = search_clip(mat.param.data[e], x, spec, grid=cfg.clip_grid,
                                                       max_shrink=cfg.clip_max_shrink, mode=cfg.clip_mode)
        return out


def _reduce_to(v: torch.Tensor, expand: torch.Tensor, n: int) -> torch.Tensor:
    out = torch.zeros(n, device=v.device, dtype=torch.float32).index_add_(0, expand, v.float())
    cnt = torch.zeros(n, device=v.device, dtype=torch.float32).index_add_(0, expand, torch.ones_like(v, dtype=torch.float32))
    return out / cnt


def _quantize(w: torch.Tensor, spec: QuantSpec, clip_ratio, mode: str = "minmax") -> tuple[QuantizedLinear, torch.Tensor]:
    """Codes on the shared grid (scale rounded to w's dtype); dequantized weight in w's dtype."""
    scale, zero = clip_qparams(w, spec, clip_ratio, mode)
    q, deq = quantize_weight(w, spec, scale=scale.to(w.dtype).float(), zero=zero)
    return QuantizedLinear(codes=q.codes.cpu(), scale=q.scale.cpu(), zero=q.zero.cpu(), bits=q.bits,
                           group_size=q.group_size, sym=q.sym), deq


__all__ = ["AWQ", "AWQConfig", "GROUP_NAMES", "clip_qparams", "ScaleSearch", "search_scale", "search_clip",
           "fold_scale", "gqa_expand", "weight_mean", "qdq", "GramLoss"]
