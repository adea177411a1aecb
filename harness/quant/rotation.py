"""Offline residual-stream rotation (QuaRot's R1, as SliderQuant applies before weight-activation quantization).

For a pre-norm decoder whose architecture descriptor (harness/arch.py) has a `rotation` (llama, mistral,
qwen2, qwen3, granite, phi3) and an orthogonal Q ([hidden, hidden]):
  1. every RMSNorm's weight g is folded into the linears it feeds (W[:, j] *= g[j]) and set to 1
     (the descriptor's norm -> readers pairs, e.g. input_layernorm -> q/k/v; the final norm -> lm_head);
  2. the residual stream is rotated: embeddings E <- E Q; linears reading it W <- W Q (the readers and
     lm_head); linears writing it W <- Q^T W, b <- b Q (the descriptor's writers: o_proj, down_proj).
A weight-free RMSNorm commutes with Q (||xQ|| = ||x||), so the model computes the same function up to
floating-point error, while activations lose their outlier channels — which is what makes 4-bit
per-token activations usable. Nothing is added at run time, so the rotated model is an ordinary
checkpoint. Q is a randomised Hadamard matrix diag(±1)·H/sqrt(n), seeded: Sylvester's for n = 2^k, and for
other widths the "had-K" construction QuaRot and SliderQuant use, H = H_K ⊗ H_{2^m} with n = K·2^m (their
code stores H_K for K = 12, 20, 28, 36, 40, ... as tables; here H_K comes from Paley's constructions
I (K = q + 1, q ≡ 3 mod 4 prime) or II (K = 2(q + 1), q ≡ 1 mod 4 prime), which give Hadamard matrices of
the same orders — not necessarily the same matrices, so a rotation is equivalent in kind, not bit-identical).
A width with no such factorisation falls back to a seeded random orthogonal matrix (QR of a Gaussian).
Tied embeddings are untied (the head gets the final norm folded in).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from harness import arch
from harness.quant.runner import on_device


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:                       # H_2k = [[H, H], [H, -H]]
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(q ** 0.5) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = χ(j - i) over GF(q) (q prime): the quadratic character, χ(0) = 0."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = [0] + [1 if a in squares else -1 for a in range(1, q)]
    return torch.tensor([[chi[(j - i) % q] for j in range(q)] for i in range(q)], dtype=torch.float64)


def paley_hadamard(k: int):
    """A Hadamard matrix of order k from Paley's construction I or II, or None."""
    if _is_prime(k - 1) and (k - 1) % 4 == 3:                      # I: H = I + [[0, 1ᵀ], [-1, Q]]
        q = k - 1
        s = torch.zeros(k, k, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(q)
        return torch.eye(k, dtype=torch.float64) + s
    if k % 2 == 0 and _is_prime(k // 2 - 1) and (k // 2 - 1) % 4 == 1:   # II: from the conference matrix C
        q = k // 2 - 1
        c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _jacobsthal(q)
        a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)
    return None


def hadamard(n: int):
    """An [n, n] ±1 Hadamard matrix (H Hᵀ = n I): Sylvester for 2^k, had-K (H_K ⊗ H_2^m) otherwise; None if
    neither construction reaches n."""
    if n & (n - 1) == 0:
        return _sylvester(n)
    m = 0
    while n % (2 ** (m + 1)) == 0:
        m += 1
    for j in range(m, -1, -1):                  # the smallest K = n / 2^j first
        hk = paley_hadamard(n // 2 ** j)
        if hk is not None:
            return torch.kron(hk, _sylvester(2 ** j))
    return None


def random_orthogonal(n: int, seed: int = 0) -> torch.Tensor:
    """A seeded random orthogonal [n, n] matrix in float64: diag(±1) H / sqrt(n) with H = hadamard(n), else QR."""
    gen = torch.Generator().manual_seed(seed)
    h = hadamard(n)
    if h is not None:
        signs = torch.randint(0, 2, (n,), generator=gen).to(torch.float64) * 2 - 1
        return signs[:, None] * h / n ** 0.5
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]


def _fold_norm(norm: nn.Module, linears: list[nn.Linear]) -> None:
    g = norm.weight.data.double()
    for lin in linears:
        lin.weight.data = (lin.weight.data.double() * g[None, :]).to(lin.weight.dtype)
    norm.weight.data.fill_(1.0)


def _read(lin: nn.Linear, q: torch.Tensor) -> None:          # x Q in: W <- W Q
    lin.weight.data = (lin.weight.data.double() @ q.to(lin.weight.device)).to(lin.weight.dtype)


def _write(lin: nn.Linear, q: torch.Tensor) -> None:         # y Q out: W <- Q^T W, b <- b Q
    q = q.to(lin.weight.device)
    lin.weight.data = (q.T @ lin.weight.data.double()).to(lin.weight.dtype)
    if lin.bias is not None:
        lin.bias.data = (lin.bias.data.double() @ q).to(lin.bias.dtype)


def check_rotatable(model: nn.Module, method: str = "sliderquant") -> arch.Family:
    """UserError (one line, naming the family and what is supported) unless the descriptor has a rotation."""
    return arch.check_method(model, method, rotate=True)


@torch.no_grad()
def rotate_model(model: nn.Module, seed: int = 0, device=None) -> torch.Tensor:
    """Fold the norms and rotate the residual stream in place; returns Q (float64).

    device: where the arithmetic runs, one layer at a time (the model may live on CPU); None: in place."""
    fam = check_rotatable(model)
    base = model.model
    head = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    if head.weight is emb.weight:               # the head is about to differ from the embeddings
        head.weight = nn.Parameter(emb.weight.detach().clone())
        model.config.tie_word_embeddings = False
    q = random_orthogonal(model.config.hidden_size, seed)
    with on_device(head, device), on_device(base.norm, device):
        _fold_norm(base.norm, [head])
        _read(head, q)
    with on_device(emb, device):
        emb.weight.data = (emb.weight.data.double() @ q.to(emb.weight.device)).to(emb.weight.dtype)
    rot = fam.rotation
    for layer in base.layers:
        with on_device(layer, device):
            for norm, readers in rot.norms:
                lins = [layer.get_submodule(r) for r in readers]
                _fold_norm(layer.get_submodule(norm), lins)
                for lin in lins:
                    _read(lin, q)
            for w in rot.writers:
                _write(layer.get_submodule(w), q)
    return q


__all__ = ["rotate_model", "random_orthogonal", "hadamard", "paley_hadamard", "check_rotatable"]
