import pytest
import torch

from harness.quant.quantizer import (QuantSpec, compute_qparams, dequantize, fake_quantize, fake_quantize_ste,
                                     quantize_codes, quantize_weight)
from harness.types import UserError


def test_hand_computed_asym_per_channel():
    # Row [-1, 0, 0.5, 2] at 2 bits: range [-1, 2], scale 3/3 = 1, zero round(1/1) = 1.
    w = torch.tensor([[-1.0, 0.0, 0.5, 2.0]])
    spec = QuantSpec(bits=2, group_size=-1, sym=False)
    scale, zero = compute_qparams(w, spec)
    assert scale.item() == pytest.approx(1.0) and zero.item() == 1
    codes = quantize_codes(w, scale, zero, spec)
    assert codes.tolist() == [[0, 1, 1, 3]]           # round(0.5) = 0 (half to even), + zero 1
    assert dequantize(codes, scale, zero, -1).tolist() == [[-1.0, 0.0, 0.0, 2.0]]


def test_hand_computed_sym():
    # 4-bit sym: scale = max|w| / 7.5, zero 8, signed codes in [-8, 7].
    w = torch.tensor([[-3.0, 1.5, 0.0, 1.0]])
    spec = QuantSpec(bits=4, group_size=-1, sym=True)
    scale, zero = compute_qparams(w, spec)
    assert scale.item() == pytest.approx(0.4) and zero.item() == 8
    codes = quantize_codes(w, scale, zero, spec)
    assert codes.tolist() == [[0.0, 12.0, 8.0, 10.0]]   # -3/0.4=-7.5 -> -8 (round half even), 3.75 -> 4, 2.5 -> 2


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("group_size", [-1, 32, 128])
@pytest.mark.parametrize("sym", [False, True])
def test_codes_in_range_and_error_bounded(bits, group_size, sym):
    torch.manual_seed(bits * 7 + group_size)
    w = torch.randn(16, 256)
    spec = QuantSpec(bits=bits, group_size=group_size, sym=sym)
    q, deq = quantize_weight(w, spec)
    assert q.codes.min() >= 0 and q.codes.max() <= 2 ** bits - 1
    n_groups = 1 if group_size == -1 else 256 // group_size
    assert q.scale.shape == (16, n_groups) and q.zero.shape == (16, n_groups)
    # Within range, the error of round-to-nearest is at most half a step.
    step = q.scale.repeat_interleave(256 // n_groups, dim=1)
    assert torch.all((w - deq).abs() <= step / 2 + 1e-5)


def test_error_falls_with_bits_and_smaller_groups():
    torch.manual_seed(0)
    w = torch.randn(64, 256) * torch.linspace(0.1, 3, 256)
    err = lambda **kw: (w - fake_quantize(w, QuantSpec(**kw))).pow(2).mean().item()
    errs = [err(bits=b, group_size=128) for b in range(2, 9)]
    assert all(a > b for a, b in zip(errs, errs[1:]))
    assert err(bits=3, group_size=32) < err(bits=3, group_size=128) < err(bits=3, group_size=-1)


def test_all_zero_group_is_exact():
    w = torch.zeros(2, 64)
    _, deq = quantize_weight(w, QuantSpec(bits=3, group_size=32))
    assert torch.equal(deq, w)


def test_ste_matches_fake_quant_and_passes_gradients():
    torch.manual_seed(1)
    w = torch.randn(8, 64, requires_grad=True)
    spec = QuantSpec(bits=3, group_size=32)
    scale, zero = compute_qparams(w.detach(), spec)
    out = fake_quantize_ste(w, scale, zero, spec)
    assert torch.allclose(out, fake_quantize(w.detach(), spec, scale, zero), atol=1e-6)
    out.sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0


@pytest.mark.parametrize("kw,msg", [({"bits": 1}, "quant.bits=1"), ({"bits": 9}, "quant.bits=9"),
                                    ({"group_size": 48}, "quant.group_size=48")])
def test_bad_spec_names_key_and_allowed(kw, msg):
    with pytest.raises(UserError, match=msg) as e:
        QuantSpec(**kw)
    assert "allowed" in str(e.value)


def test_group_size_must_divide_width():
    with pytest.raises(UserError, match="does not divide the input width 96"):
        QuantSpec(group_size=64).check_width("layer", 96)
