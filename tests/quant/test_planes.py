"""int8 codes as two 4-bit planes and activations as two int8 terms (fptq.quant.planes)."""
import pytest
import torch

from fptq.quant import quantize_per_token
from fptq.quant.planes import PLANES_QMAX, int8_group_quantize, merge_planes, split_planes, two_term_per_token


def test_every_code_in_range_splits_into_two_4_bit_planes_and_back():
    q = torch.arange(-PLANES_QMAX, PLANES_QMAX + 1, dtype=torch.int8)
    hi, lo = split_planes(q)
    assert hi.dtype == lo.dtype == torch.int8
    assert int(hi.min()) >= -8 and int(hi.max()) <= 7 and int(lo.min()) >= -8 and int(lo.max()) <= 7
    assert torch.equal(hi.to(torch.int16) * 16 + lo.to(torch.int16), q.to(torch.int16))
    assert torch.equal(merge_planes(hi, lo), q)
    for bad in (PLANES_QMAX + 1, -PLANES_QMAX - 1):
        with pytest.raises(ValueError, match="codes must lie in"):
            split_planes(torch.tensor([bad], dtype=torch.int8))


def test_int8_group_quantize_rounds_to_nearest_within_half_a_step_with_a_ragged_last_group():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 150, generator=g) * torch.rand(40, 1, generator=g)
    w[3, 64:128] = 0  # an all-zero group
    q, s = int8_group_quantize(w, 64)
    assert q.shape == w.shape and q.dtype == torch.int8 and s.shape == (40, 3) and s.dtype == torch.float16
    assert int(q.abs().max()) == PLANES_QMAX
    assert s[3, 1] == 0 and not q[3, 64:128].any()
    absmax = torch.nn.functional.pad(w.abs(), (0, 42)).view(40, 3, 64).amax(-1)
    assert torch.equal(s, (absmax / PLANES_QMAX).half())
    step = s.float().repeat_interleave(64, 1)[:, :150]
    err = (q.float() * step - w).abs()
    assert (err <= step / 2 + 1e-3 * step).all()  # the float16 scale may clip the extreme by a hair
    with pytest.raises(ValueError, match="2-D weight"):
        int8_group_quantize(w[0], 64)
    with pytest.raises(ValueError, match="non-finite"):
        int8_group_quantize(torch.full((2, 8), float("inf")), 8)


def test_two_terms_are_the_rows_and_their_residuals_quantized_per_token():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 96, generator=g)
    x[:, 7] *= 40  # an outlier channel: one int8 term loses the small ones
    x[4] = 0
    q, s = two_term_per_token(x)
    assert q.shape == (2, 5, 96) and s.shape == (2, 5, 1)
    q1, s1 = quantize_per_token(x)
    assert torch.equal(q[0], q1) and torch.equal(s[0], s1)
    q2, s2 = quantize_per_token(x - q1.float() * s1)
    assert torch.equal(q[1], q2) and torch.equal(s[1], s2)
    one = (q1.float() * s1 - x).abs().amax(-1)
    two = ((q.float() * s).sum(0) - x).abs().amax(-1)
    assert (two[:4] <= one[:4] / 100).all()  # about 15 bits per row instead of 8
    assert not q[:, 4].any()
