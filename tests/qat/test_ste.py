"""Straight-through fake-quantizers: the forward values are the package's fake-quantizers exactly; the
gradients are the STE's (identity) and LSQ's (static scale)."""
import pytest
import torch

from fptq.nn import QuantLinear
from fptq.quant import act_qmax, fake_quantize_per_token, fake_quantize_weight, quantize_weight, weight_scales
from fptq.quant.ste import (
    fake_quantize_per_token_ste,
    fake_quantize_static_ste,
    fake_quantize_weight_ste,
    round_ste,
)


@pytest.mark.parametrize("group_size", [-1, 16, 24])
def test_weight_ste_forward_exact_and_gradient_identity(group_size):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 40, generator=g).requires_grad_(True)
    out = fake_quantize_weight_ste(w, 4, group_size)
    assert torch.equal(out.detach(), fake_quantize_weight(w.detach(), 4, group_size))
    upstream = torch.randn(12, 40, generator=g)
    out.backward(upstream)
    assert torch.equal(w.grad, upstream)


def test_per_token_ste_forward_exact_and_gradient_identity():
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(3, 5, 32, generator=g) * 4).requires_grad_(True)
    out = fake_quantize_per_token_ste(x, 8)
    assert torch.equal(out.detach(), fake_quantize_per_token(x.detach(), 8))
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_round_ste():
    x = torch.tensor([0.4, 1.6, -2.5], requires_grad=True)
    y = round_ste(x)
    assert torch.equal(y.detach(), torch.round(x.detach()))
    (y * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert torch.equal(x.grad, torch.tensor([1.0, 2.0, 3.0]))


def test_static_ste_matches_quantlinear_and_lsq_gradients():
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(64, 16, generator=g) * 3).requires_grad_(True)
    s = torch.tensor(0.02, requires_grad=True)  # clips |x| > 127 * 0.02 = 2.54
    out = fake_quantize_static_ste(x, s, 8)

    # forward: the values QuantLinear's reference path multiplies by (identity weight, no bias)
    eye = torch.eye(16)
    ql = QuantLinear.from_codes(quantize_weight(eye, weight_scales(eye, 8, -1), 8, -1), weight_scales(eye, 8, -1),
                                wbits=8, group_size=-1, abits=8, act_mode="static_tensor", act_scale=0.02)
    w = ql.dequantized_weight()
    assert torch.allclose(out.detach() @ w.t(), ql(x.detach()), rtol=0, atol=1e-6)

    out.sum().backward()
    qmax = act_qmax(8)
    v = x.detach() / 0.02
    inside = torch.round(v).abs() <= qmax  # the code is not clipped
    # LSQ (Esser et al. 2020): dx = 1 inside the range, 0 outside; ds = round(v) - v inside, +-qmax outside
    assert torch.equal(x.grad, inside.float())
    want_s = torch.where(inside, torch.round(v) - v, torch.sign(v) * qmax).sum()
    assert torch.allclose(s.grad, want_s, rtol=1e-4, atol=1e-3)
    assert (~inside).any() and inside.any()  # both branches exercised
