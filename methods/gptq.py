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
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.quant.context import MethodConfig, QuantContext
from harness.quant.quantizer import QuantSpec, compute_qparams, dequantize, quantize_codes
from harness.quant.runner import LayerwiseRunner, record_inputs, tokens_of
from harness.registry import register_method
from harness.types import QuantizedLinear, QuantResult, UserError


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


def check_config(cfg: GPTQConfig) -> None:
    checks = [("block_size", cfg.block_size >= 1, "an integer >= 1"),
              ("damp", 0 < cfg.damp < 1, "(0, 1)"),
              ("mse_grid", cfg.mse_grid >= 1, "an integer >= 1"),
              ("mse_max_shrink", 0 <= cfg.mse_max_shrink < 1, "[0, 1)"),
              ("mse_norm", cfg.mse_norm > 0, "> 0"),
              ("batch_tokens", cfg.batch_tokens >= 1, "an integer >= 1"),
              ("offload", cfg.offload in ("auto", "cpu", "device"), "auto, cpu, device")]
    for key, ok, allowed in checks:
        if not ok:
            raise UserError(f"method.{key}={getattr(cfg, key)!r} is not allowed; allowed: {allowed}")


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
    """Running H = 2/n Σ x xᵀ, fed batch by batch from a forward hook."""

    def __init__(self, width: int, device):
        self.h = torch.zeros(width, width, device=device, dtype=torch.float32)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = tokens_of(x)
        t = x.shape[0]
        self.h.mul_(self.n / (self.n + t))
        self.n += t
        x = x * (2.0 / self.n) ** 0.5
        self.h.addmm_(x.T, x)


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

    Returns the codes on the shared quantizer's grid and the dequantized weight (w's dtype), which is
    exactly `dequantize(codes, scale, zero)` — what the exporter writes.
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
        group_of = perm // gs
    else:
        group_of = torch.arange(cols, device=W.device) // gs

    U = _inverse_cholesky(H, damp)
    codes = torch.empty(rows, cols, device=W.device)
    maxq = spec.maxq
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.empty_like(W1)
        E1 = torch.empty_like(W1)
        U1 = U[i1:i2, i1:i2]
        for j in range(i2 - i1):
            col = i1 + j
            if not static and col % gs == 0:     # lazy group grid from the error-updated weights
                g = col // gs
                s_g, z_g = _lazy_grid(W, W1, i1, i2, col, gs, spec, scale_dtype, mse)
                scale[:, g], zero[:, g] = s_g[:, 0], z_g[:, 0]
            g = group_of[col]
            s, z = scale[:, g], zero[:, g]
            w_col = W1[:, j]
            q = torch.clamp(torch.round(w_col / s) + z, 0, maxq)       # the shared quantizer's formula
            deq = (q - z) * s
            codes[:, col] = q
            Q1[:, j] = deq
            err = (w_col - deq) / U1[j, j]
            E1[:, j] = err
            W1[:, j:] -= err.unsqueeze(1) * U1[j, j:].unsqueeze(0)
        W[:, i1:i2] = Q1
        W[:, i2:] -= E1 @ U[i1:i2, i2:]

    if perm is not None:
        inv = torch.argsort(perm)
        codes = codes[:, inv]
    q = QuantizedLinear(codes=codes.to(torch.uint8), scale=scale, zero=zero,
                        bits=spec.bits, group_size=spec.group_size, sym=spec.sym)
    deq = dequantize(q.codes, q.scale, q.zero, spec.group_size).to(dtype)
    return q, deq


def _lazy_grid(W, W1, i1, i2, col, gs, spec, scale_dtype, mse):
    """Grid of the group starting at `col`, from the current (error-updated) weights.

    Columns of the group inside the current block are read from the block's working copy W1; any
    beyond the block (group larger than the block) from W, which already holds the block-level update.
    """
    inside = W1[:, col - i1:min(col + gs, i2) - i1]
    if col + gs > i2:
        inside = torch.cat([inside, W[:, i2:col + gs]], dim=1)
    sub = QuantSpec(bits=spec.bits, group_size=-1, sym=spec.sym, clip_ratio=spec.clip_ratio)
    return grid_for(inside, sub, scale_dtype, mse)


# ------------------------------------------------------------------ the method

@register_method("gptq")
class GPTQ:
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
        result = QuantResult(info={"layers": {}})
        runner = LayerwiseRunner(model, ids, ctx.device, batch_tokens=cfg.batch_tokens, offload=cfg.offload,
                                 progress=ctx.progress, desc="gptq")

        def on_window(win):
            linears = win.linears(cfg.include, cfg.exclude)
            if not linears:
                return
            for name, lin in linears.items():
                spec.check_width(name, lin.in_features)
            stages = win.stages(linears) if cfg.true_sequential else [list(linears)]
            for stage in stages:
                mods = {n: linears[n] for n in stage}
                acc = {n: HessianAccumulator(m.in_features, win.device) for n, m in mods.items()}
                with record_inputs(mods, lambda n, x: acc[n].add(x)):
                    win.forward(stop_when=mods.values())
                for n, lin in mods.items():
                    if acc[n].n == 0:
                        raise RuntimeError(f"gptq: {n} saw no calibration input")
                    q, deq = gptq_quantize(lin.weight.data, acc[n].h, spec, block_size=cfg.block_size,
                                           damp=cfg.damp, act_order=cfg.act_order, mse=self.mse_options())
                    del acc[n]
                    lin.weight.data.copy_(deq)
                    result.layers[n] = _to_cpu(q)
        runner.run(on_window)
        return result


def _to_cpu(q: QuantizedLinear) -> QuantizedLinear:
    return QuantizedLinear(codes=q.codes.cpu(), scale=q.scale.cpu(), zero=q.zero.cpu(), bits=q.bits,
                           group_size=q.group_size, sym=q.sym)


__all__ = ["GPTQ", "GPTQConfig", "gptq_quantize", "hessian_from", "HessianAccumulator", "mse_grid", "grid_for"]
