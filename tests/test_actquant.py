"""Per-token activation fake-quantization and the offline residual rotation that W4A4 relies on."""
import copy

import numpy as np
import pytest
import torch

from harness.quant.actquant import ActSpec, fake_quantize_tokens, install, installed
from harness.quant.rotation import random_orthogonal, rotate_model
from harness.toy.tokenizer import build_tokenizer
from harness.toy.train import new_model
from harness.types import UserError


def _reference(x: np.ndarray, bits: int, sym: bool) -> np.ndarray:
    """Token by token, written out as OmniQuant's per-token quantizer does it."""
    out = np.empty_like(x)
    for i, t in enumerate(x.reshape(-1, x.shape[-1])):
        if sym:
            qmax = 2 ** (bits - 1) - 1
            s = max(np.abs(t).max() / qmax, 1e-5)
            q = np.clip(np.round(t / s), -qmax, qmax) * s
        else:
            qmax = 2 ** bits - 1
            s = max((t.max() - t.min()) / qmax, 1e-5)
            z = np.round(-t.min() / s)
            q = (np.clip(np.round(t / s) + z, 0, qmax) - z) * s
        out.reshape(-1, x.shape[-1])[i] = q
    return out


@pytest.mark.parametrize("bits,sym", [(4, False), (4, True), (8, False), (2, False)])
def test_per_token_fake_quant_matches_reference(bits, sym):
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(bits)) * torch.linspace(0.1, 4, 64)
    got = fake_quantize_tokens(x, ActSpec(bits, sym))
    ref = _reference(x.double().numpy(), bits, sym)
    np.testing.assert_allclose(got.double().numpy(), ref, rtol=0, atol=1e-5)
    assert max(len(torch.unique(t)) for t in got.reshape(-1, 64)) <= 2 ** bits


def test_gamma_quantizes_leading_columns_on_the_whole_token_grid():
    x = torch.randn(4, 10)
    full = fake_quantize_tokens(x, ActSpec(4))
    half = fake_quantize_tokens(x, ActSpec(4), gamma=0.5)
    assert torch.equal(half[:, :5], full[:, :5]) and torch.equal(half[:, 5:], x[:, 5:])


def test_straight_through_gradient_and_zero_tokens():
    x = torch.randn(2, 8, requires_grad=True)
    fake_quantize_tokens(x, ActSpec(4)).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert torch.equal(fake_quantize_tokens(torch.zeros(2, 8), ActSpec(4)), torch.zeros(2, 8))


def test_install_hooks_named_linears_only():
    lin, other = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
    model = torch.nn.ModuleDict({"a": lin, "b": other})
    install(model, ["a"], ActSpec(2))
    install(model, ["a"], ActSpec(2))                  # idempotent: one hook
    assert len(lin._forward_pre_hooks) == 1 and not other._forward_pre_hooks
    assert installed(model) == ActSpec(2)
    x = torch.randn(3, 8)
    assert torch.allclose(lin(x), torch.nn.functional.linear(fake_quantize_tokens(x, ActSpec(2)), lin.weight, lin.bias))
    with pytest.raises(ValueError, match="not a Linear"):
        install(model, ["c"], ActSpec(2))


@pytest.mark.parametrize("n", [128, 96])
def test_random_orthogonal(n):
    q = random_orthogonal(n, seed=3)
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-10)
    assert torch.equal(q, random_orthogonal(n, seed=3)) and not torch.equal(q, random_orthogonal(n, seed=4))


def test_rotation_keeps_the_function_and_spreads_outliers():
    tok = build_tokenizer()
    model = new_model(tok, seed=0).eval()
    with torch.no_grad():        # an outlier channel in the residual stream, as real LLMs have
        model.model.embed_tokens.weight[:, 7] *= 30
    ids = torch.randint(0, len(tok), (2, 24), generator=torch.Generator().manual_seed(0))
    rotated = copy.deepcopy(model)
    rotate_model(rotated, seed=0)
    assert model.config.tie_word_embeddings and not rotated.config.tie_word_embeddings
    assert rotated.lm_head.weight is not rotated.model.embed_tokens.weight

    def layer0_input(m):
        seen = {}
        h = m.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda mod, a: seen.setdefault("x", a[0]))
        with torch.no_grad():
            logits = m(ids).logits
        h.remove()
        x = seen["x"]
        return logits, float((x.abs().amax(-1) / x.pow(2).mean(-1).sqrt()).mean())

    on_device = copy.deepcopy(model)        # the arithmetic one layer at a time on a device, the model back home
    rotate_model(on_device, seed=0, device=torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(on_device.state_dict().values(), rotated.state_dict().values()))
    ref, peak_before = layer0_input(model)
    out, peak_after = layer0_input(rotated)
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)
    assert peak_after < 0.5 * peak_before          # max/rms per token: the outlier is spread over all channels


def test_rotation_refuses_unsupported_architectures():
    model = new_model(build_tokenizer(), seed=0)
    model.config.model_type = "olmo2"               # post-norm: the norms cannot be folded into the linears
    with pytest.raises(UserError, match="model_type 'olmo2'.*set method.rotate=false"):
        rotate_model(model)
