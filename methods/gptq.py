"""GPTQ (Frantar et al., 2022): column-by-column quantization with second-order error compensation.

Per decoder layer, on the layer-wise runner: accumulate H = 2/n Σ x xᵀ over the calibration inputs
of each linear, then quantize the weight columns in blocks (lazy batch updates), spreading each
column's rounding error over the not-yet-quantized columns through the Cholesky factor of H⁻¹.

- damp: λ = damp · mean(diag H) added to the diagonal (raised ×10 until H is positive definite).
- act_order: columns in order of decreasing diag(H), with *static groups* — every group's grid is
  fixed from the original weights up front, so groups stay contiguous in the checkpoint (no g_idx)
  and the exported codes/scales are exactly what vLLM's kernels read.
  Without act_order, a group's grid is computed when GPTQ reaches its first column (the reference
  implementation's default), from the error-updated weights.
- true_sequential: inside a layer, linears sharing an input are quantized together and the later
  ones see inputs produced by the already-quantized earlier ones (q/k/v → o → gate/up → down).
- mse_clip: optional per-group range shrink chosen to minimise |w − Q(w)|^mse_norm (the reference
  code's `mse` option), on the shared quantizer's grid.
- MoE (fused 3-D expert tensors, harness/arch.py): after the layer's linears, each expert's gate_up slice
  is solved with the Hessian of the tokens the router sends to it, then each expert's down slice with the
  Hessian of its own intermediate activations (computed through its already-quantized gate_up). An expert
  that receives fewer than `expert_min_tokens` (a fraction of the calibration tokens) falls back to
  round-to-nearest, as GPTQModel's default `Fallback(strategy=RTN, threshold="0.5%")`
  (gptqmodel/quantization/config.py). The router is never quantized.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from harness.quant.context import MethodConfig, QuantContext
from harness import arch
from harness.quant.quantizer import QuantSpec, compute_qparams, dequantize, quantize_codes, quantize_weight
from harness.quant.runner import LayerwiseRunner, record_inputs, tokens_of
from harness.registry import register_method
from harness.types import check_values, QuantizedLinear, QuantResult


@dataclass
class GPTQConfig(MethodConfig):
    block_size: int = 128
    damp: float = 0.01
    act_order: bool = True
    true_sequential: bool = True
    mse_clip: bool = False
    mse_grid: int = 100
    mse_max_shrink: float = 0.8
    mse_norm: float = 2.4
    batch_tokens: int = 8192        # tokens per calibration forward
    offload: str = "auto"           # calibration activations: auto | cpu | device
    expert_min_tokens: float = 0.005    # MoE: experts routed fewer than this fraction of the tokens -> RTN (GPTQModel)


def check_config(cfg: GPTQConfig) -> None:
    checks = [("block_size", cfg.block_size >= 1, "an integer >= 1"),
              ("damp", 0 < cfg.damp < 1, "(0, 1)"),
              ("mse_grid", cfg.mse_grid >= 1, "an integer >= 1"),
              ("mse_max_shrink", 0 <= cfg.mse_max_shrink < 1, "[0, 1)"),
              ("mse_norm", cfg.mse_norm > 0, "> 0"),
              ("batch_tokens", cfg.batch_tokens >= 1, "an integer >= 1"),
              ("expert_min_tokens", 0 <= cfg.expert_min_tokens < 1, "[0, 1)"),
              ("offload", cfg.offload in ("auto", "cpu", "device"), "auto, cpu, device")]
    check_values("method", cfg, checks)


# ------------------------------------------------------------------ grid helpers

def grid_for(w: torch.Tensor, spec: QuantSpec, dtype: torch.dtype, mse: dict | None = None):
    """(scale, zero) [rows, n_groups] for w [rows, cols], rounded to the checkpoint's scale dtype.

    Rounding the scale to the model dtype before computing codes makes the codes optimal for the grid
    that is actually stored (and the exported checkpoint decode to exactly these weights).
    """
    if mse is None:
        scale, zero = compute_qparams(w, spec)
    else:
        scale, zero = mse_grid(w, spec, **mse)
    return scale.to(dtype).float(), zero


def mse_grid(w: torch.Tensor, spec: QuantSpec, grid: int = 100, max_shrink: float = 0.8, norm: float = 2.4):
    """Per-group clip ratio in [1 - max_shrink, 1] minimising Σ|w - Q(w)|^norm over the group."""
    rows, cols = w.shape
    g = cols if spec.group_size <= 0 else spec.group_size
    wg = w.float().reshape(rows, cols // g, g)
    best_err = torch.full(wg.shape[:2], float("inf"), device=w.device)
    best_ratio = torch.ones(wg.shape[:2], device=w.device)
    steps = int(max_shrink * grid)
    for i in range(steps + 1):
        ratio = 1 - i / grid
        scale, zero = compute_qparams(w, spec, clip_ratio=ratio)
        deq = dequantize(quantize_codes(w, scale, zero, spec), scale, zero, spec.group_size)
        err = (deq.reshape_as(wg) - wg).abs().pow(norm).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, torch.full_like(best_ratio, ratio), best_ratio)
    return compute_qparams(w, spec, clip_ratio=best_ratio)


# ------------------------------------------------------------------ the algorithm

def hessian_from(inputs: list[torch.Tensor]) -> torch.Tensor:
    """H = 2/n Σ x xᵀ over all tokens of the given [*, in] inputs (float32)."""
    h, n = None, 0
    for x in inputs:
        x = tokens_of(x)
        h = x.T @ x if h is None else h + x.T @ x
        n += x.shape[0]
    return h * (2.0 / n)


class HessianAccumulator:
    """Running H = 2/n Σ x xᵀ, fed batch by batch from a forward hook.

    Wide inputs update only the blocks on and above the diagonal (H is symmetric), which saves about
    a third of the multiply-adds; `h` mirrors them when read.
    """
    BLOCK = 512

    def __init__(self, width: int, device):
        self._h = torch.zeros(width, width, device=device, dtype=torch.float32)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = tokens_of(x)
        t = x.shape[0]
        self._h.mul_(self.n / (self.n + t))
        self.n += t
        x = x * (2.0 / self.n) ** 0.5
        width = x.shape[1]
        if width < 2 * self.BLOCK:
            self._h.addmm_(x.T, x)
            return
        edges = list(range(0, width, self.BLOCK)) + [width]
        for a0, a1 in zip(edges, edges[1:]):
            xa = x[:, a0:a1].T
            self._h[a0:a1, a0:].addmm_(xa, x[:, a0:])

    @property
    def h(self) -> torch.Tensor:
        width = self._h.shape[0]
        if width >= 2 * self.BLOCK:
            upper = torch.triu(self._h)
            return upper + torch.triu(self._h, diagonal=1).T
        return self._h


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹, raising λ until H + λI is positive definite."""
    mean_diag = torch.mean(torch.diag(h))
    eye = torch.eye(h.shape[0], device=h.device, dtype=h.dtype)
    for attempt in range(6):
        lam = damp * (10 ** attempt) * mean_diag
        L, info = torch.linalg.cholesky_ex(h + lam * eye)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return U
    raise RuntimeError("GPTQ: the Hessian is not positive definite even with 10^5 x damping")


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, h: torch.Tensor, spec: QuantSpec, *, block_size: int = 128,
                  damp: float = 0.01, act_order: bool = True, mse: dict | None = None,
                  scale_dtype: torch.dtype | None = None) -> tuple[QuantizedLinear, torch.Tensor]:
    """GPTQ on one weight [out, in] with Hessian h [in, in].

    Rows are independent given H, so linears that share an input (q/k/v, gate/up) can be stacked along
    the output dim and solved in one call. Returns the codes on the shared quantizer's grid and the
    dequantized weight (w's dtype), which is exactly `dequantize(codes, scale, zero)` — what the
    exporter writes.
    """
    dtype = w.dtype
    scale_dtype = scale_dtype or dtype
    W = w.detach().float().clone()
    H = h.detach().float().clone()
    rows, cols = W.shape
    spec.check_width("weight", cols)
    gs = cols if spec.group_size <= 0 else spec.group_size
    n_groups = cols // gs

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    scale = torch.empty(rows, n_groups, device=W.device)
    zero = torch.empty(rows, n_groups, device=W.device)
    static = act_order or n_groups == 1
    if static:      # every group's grid from the original weights, before any error update
        scale[:], zero[:] = grid_for(W, spec, scale_dtype, mse)

    perm = torch.argsort(torch.diag(H), descending=True) if act_order else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
        group_of = (perm // gs).tolist()
    else:
        group_of = [c // gs for c in range(cols)]

    U = _inverse_cholesky(H, damp)
    diag = U.diagonal().tolist()
    # Work on the transpose: a weight column is a contiguous row of WT.
    WT = W.T.contiguous()
    del W
    codesT = torch.empty(cols, rows, device=WT.device)
    scaleT, zeroT = scale.T.contiguous(), zero.T.contiguous()
    per_row = QuantSpec(bits=spec.bits, group_size=-1, sym=spec.sym, clip_ratio=spec.clip_ratio)
    maxq = spec.maxq
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = WT[i1:i2].clone()
        Q1 = torch.empty_like(W1)
        E1 = torch.empty_like(W1)
        U1 = U[i1:i2, i1:i2]
        for j in range(i2 - i1):
            col = i1 + j
            if not static and col % gs == 0:
                # Lazy group grid from the current weights: columns inside this block carry the in-block
                # updates (W1), columns past it the block-level ones (WT).
                g = col // gs
                cur = W1[j:j + gs]
                if col + gs > i2:
                    cur = torch.cat([cur, WT[i2:col + gs]], dim=0)
                s_g, z_g = grid_for(cur.T, per_row, scale_dtype, mse)
                scaleT[g], zeroT[g] = s_g[:, 0], z_g[:, 0]
            g = group_of[col]
            s, z = scaleT[g], zeroT[g]
            w_col = W1[j]
            q = torch.clamp(torch.round(w_col / s) + z, 0, maxq)       # the shared quantizer's formula
            deq = (q - z) * s
            codesT[col] = q
            Q1[j] = deq
            err = (w_col - deq) / diag[col]
            E1[j] = err
            W1[j + 1:] -= U1[j, j + 1:].unsqueeze(1) * err.unsqueeze(0)
        WT[i1:i2] = Q1
        if i2 < cols:
            WT[i2:] -= U[i1:i2, i2:].T @ E1

    codes = codesT.T
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    q = QuantizedLinear(codes=codes.to(torch.uint8).contiguous(), scale=scaleT.T.contiguous(),
                        zero=zeroT.T.contiguous(), bits=spec.bits, group_size=spec.group_size, sym=spec.sym)
    deq = dequantize(q.codes, q.scale, q.zero, spec.group_size).to(dtype)
    return q, deq


def split_rows(q: QuantizedLinear, deq: torch.Tensor, sizes: list[int]) -> list[tuple[QuantizedLinear, torch.Tensor]]:
    """Undo the stacking of several linears along the output dim."""
    out, start = [], 0
    for n in sizes:
        sl = slice(start, start + n)
        out.append((QuantizedLinear(codes=q.codes[sl].contiguous(), scale=q.scale[sl].contiguous(),
                                    zero=q.zero[sl].contiguous(), bits=q.bits, group_size=q.group_size, sym=q.sym),
                    deq[sl]))
        start += n
    return out


# ------------------------------------------------------------------ the method

@register_method("gptq")
class GPTQ:
    layerwise = True            # walks the decoder on the runner: the pipeline keeps the model on CPU meanwhile
    Config = GPTQConfig
    quantizes = True
    uses_calibration = True

    def __init__(self, cfg: GPTQConfig):
        check_config(cfg)
        self.cfg = cfg

    def mse_options(self) -> dict | None:
        c = self.cfg
        return dict(grid=c.mse_grid, max_shrink=c.mse_max_shrink, norm=c.mse_norm) if c.mse_clip else None

    @torch.no_grad()
    def quantize(self, model, ctx: QuantContext) -> QuantResult:
        ids = ctx.calibration_ids()          # before any weight changes (reasoning traces use the fp model)
        cfg, spec = self.cfg, ctx.spec
        arch.check_method(model, "gptq")
        result = QuantResult(info={"experts_rtn_fallback": [], "expert_tokens": {}})
        min_tokens = cfg.expert_min_tokens * ids.numel()
        self._spec = spec
        runner = LayerwiseRunner(model, ids, ctx.device, batch_tokens=cfg.batch_tokens, offload=cfg.offload,
                                 progress=ctx.progress, desc="gptq")

        def on_window(win):
            weights = win.weights(cfg.include, cfg.exclude)
            for name, lin in weights.items():
                spec.check_width(name, lin.in_features)
            linears = {n: m for n, m in weights.items() if isinstance(m, nn.Linear)}
            experts = {n: m for n, m in weights.items() if isinstance(m, arch.ExpertMatrix)}
            if experts:
                self._experts_after = (experts, min_tokens)
            if not linears:
                self._solve_experts(win, result)
                return
            # Linears sharing an input share a Hessian: one accumulator and one solve per stage.
            stages = win.stages(linears)
            passes = [[st] for st in stages] if cfg.true_sequential else [stages]
            for group in passes:
                acc = [HessianAccumulator(linears[st[0]].in_features, win.device) for st in group]
                firsts = {st[0]: a for st, a in zip(group, acc)}
                with record_inputs({n: linears[n] for n in firsts}, lambda n, x: firsts[n].add(x)):
                    win.forward(stop_before=[linears[n] for n in firsts])     # nothing past the inputs needed
                for st, a in zip(group, acc):
                    if a.n == 0:
                        raise RuntimeError(f"gptq: {st[0]} saw no calibration input")
                    self._solve(st, [linears[n] for n in st], a.h, spec, result)
                    a._h = None
            self._solve_experts(win, result)
        self._experts_after = None
        runner.run(on_window)
        return result

    def _solve_experts(self, win, result) -> None:
        """GPTQ per expert slice, gate_up then down, on the tokens routed to each expert (see the module doc)."""
        if not self._experts_after:
            return
        experts, min_tokens = self._experts_after
        self._experts_after = None
        for part in ("gate_up_proj", "down_proj"):
            mine = {n: m for n, m in experts.items() if n.endswith("." + part)}
            if not mine:
                continue
            blocks = {n: win.module(n.rpartition(".")[0]) for n in mine}
            accs: dict[str, dict[int, HessianAccumulator]] = {n: {} for n in mine}

            def hook(name, part=part):
                def fn(mod, args, kwargs):
                    x, idx = args[0], args[1]
                    x = x.reshape(-1, x.shape[-1])
                    for e in torch.unique(idx).tolist():
                        if e >= mine[name].experts:
                            continue
                        xe = x[(idx == e).any(-1)]
                        if part == "down_proj":     # the expert's own intermediate activations, quantized gate_up
                            gate, up = F.linear(xe, mod.gate_up_proj[e]).chunk(2, dim=-1)
                            xe = mod.act_fn(gate) * up
                        acc = accs[name].setdefault(e, HessianAccumulator(xe.shape[-1], xe.device))
                        acc.add(xe)
                return fn
            handles = [blocks[n].register_forward_pre_hook(hook(n), with_kwargs=True) for n in mine]
            try:
                win.forward(stop_before=list(blocks.values()))
            finally:
                for h in handles:
                    h.remove()
            for name, mat in mine.items():
                counts = {e: a.n for e, a in accs[name].items()}
                result.info["expert_tokens"][name] = [counts.get(e, 0) for e in range(mat.experts)]
                codes = []
                for e in range(mat.experts):
                    w = mat.param.data[e]
                    a = accs[name].get(e)
                    if a is None or a.n < max(1, min_tokens):
                        result.info["experts_rtn_fallback"].append(f"{name}[{e}]")
                        q, deq = quantize_weight(w, self._spec)
                    else:
                        q, deq = gptq_quantize(w, a.h, self._spec, block_size=self.cfg.block_size,
                                               damp=self.cfg.damp, act_order=self.cfg.act_order,
                                               mse=self.mse_options())
                    w.copy_(deq)
                    codes.append(_to_cpu(q))
                    accs[name].pop(e, None)
                result.layers[name] = _stack(codes)

    def _solve(self, names, lins, h, spec, result) -> None:
        cfg = self.cfg
        w = torch.cat([lin.weight.data for lin in lins], dim=0) if len(lins) > 1 else lins[0].weight.data
        q, deq = gptq_quantize(w, h, spec, block_size=cfg.block_size, damp=cfg.damp, act_order=cfg.act_order,
                               mse=self.mse_options())
        for name, lin, (qi, di) in zip(names, lins, split_rows(q, deq, [lin.out_features for lin in lins])):
            lin.weight.data.copy_(di)
            result.layers[name] = _to_cpu(qi)


def _stack(parts: list[QuantizedLinear]) -> QuantizedLinear:
    """Per-expert codes stacked as the [E·out, in] matrix the expert tensor is quantized as."""
    p = parts[0]
    return QuantizedLinear(codes=torch.cat([q.codes for q in parts]), scale=torch.cat([q.scale for q in parts]),
                           zero=torch.cat([q.zero for q in parts]), bits=p.bits, group_size=p.group_size, sym=p.sym)


def _to_cpu(q: QuantizedLinear) -> QuantizedLinear:
    return QuantizedLinear(codes=q.codes.cpu(), scale=q.scale.cpu(), zero=q.zero.cpu(), bits=q.bits,
                           group_size=q.group_size, sym=q.sym)


__all__ = ["GPTQ", "GPTQConfig", "gptq_quantize", "hessian_from", "HessianAccumulator", "mse_grid", "grid_for",
           "split_rows"]
