"""Integer group scales (fptq.quant.intscales): the structure the AMX kernel needs, found again from float16
scales, and what it costs in weight error."""
import pytest
import torch

from fptq.quant.intscales import (
    MAX_MULTIPLIER,
    MIN_MULTIPLIER,
    integer_group_scales,
    integer_scale_factors,
    integer_weight_codes,
)
from fptq.quant.weights import dequantize_weight, quantize_weight, weight_scales


def _weights(n=256, k=576, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * (torch.rand(n, 1, generator=g) * 0.05 + 1e-3)
    w[:, 7] *= 8  # an outlier input channel: its groups need larger steps than the rest of the row
    return w


def _err(w, s, gs):
    return float(((dequantize_weight(quantize_weight(w, s, 4, gs), s, gs) - w) ** 2).sum())


@pytest.mark.parametrize("k,gs", [(576, 64), (200, 64), (256, 128)])
def test_the_scales_are_a_channel_base_times_small_integers(k, gs):
    w = _weights(k=k)
    w[3] = 0  # an all-zero row
    w[5] *= 1e-4  # a tiny one: its base is float16's smallest normal number
    s = integer_group_scales(w, gs)
    assert s.dtype == torch.float16 and s.shape == (w.shape[0], -(-k // gs))
    found = integer_scale_factors(s.t().contiguous())
    assert found is not None
    base, mult = found
    assert int(mult.min()) >= MIN_MULTIPLIER and int(mult.max()) <= MAX_MULTIPLIER and bool((mult != 0).all())
    assert torch.equal((base[:, None].double() * mult.t().double()), s.double())  # exactly, in float16
    assert bool((mult < 0).any()) and bool((mult > 0).any())  # either sign: the signed-extreme rule where it helps
    assert int(mult.abs().max()) >= MAX_MULTIPLIER - 2  # the base is near the largest group's step over 16


def test_the_multiplier_search_costs_less_weight_error_than_absmax_steps():
    """Each group's integer (either sign) is the one of least squared error, so no group does worse than with
    the nearest positive multiple of its ideal step; on these weights the whole is also below float16 absmax
    steps and the signed-extreme rule (within the float clip search's reach)."""
    w, gs = _weights(), 64
    searched, nearest = integer_group_scales(w, gs), integer_group_scales(w, gs, search=False)
    groups = lambda s: ((dequantize_weight(quantize_weight(w, s, 4, gs), s, gs) - w) ** 2).view(w.shape[0], -1, gs).sum(-1)
    assert bool((groups(searched) <= groups(nearest) * (1 + 1e-6)).all())
    assert _err(w, searched, gs) < _err(w, weight_scales(w, 4, gs), gs)
    assert _err(w, searched, gs) < _err(w, weight_scales(w, 4, gs, sign="signed"), gs)
    assert _err(w, searched, gs) < 1.1 * _err(w, weight_scales(w, 4, gs, clip_search=True), gs)


def test_float_scales_have_no_integer_structure():
    w = _weights()
    assert integer_scale_factors(weight_scales(w, 4, 64).t().contiguous()) is None
    s = integer_group_scales(w, 64).t().contiguous()
    base, mult = integer_scale_factors(s)
    low = s.clone()
    low[0, 1] = -MAX_MULTIPLIER * base[1]  # -16: code -8 times it leaves int8
    assert integer_scale_factors(low) is None
    bad = s.clone()
    bad[2, 9] = bad[2, 9] * 1.001  # one scale off the grid
    assert integer_scale_factors(bad) is None


def test_padding_columns_and_one_group_per_channel():
    s = integer_group_scales(_weights(n=20), 64).t().contiguous()
    padded = torch.cat([s, torch.zeros(s.shape[0], 12, dtype=torch.float16)], 1)  # the kernels' padded layout
    base, mult = integer_scale_factors(padded)
    assert bool((base[20:] == 0).all()) and bool((mult[:, 20:] == 1).all())
    per_channel = (torch.rand(1, 40) + 0.1).half()  # one group: any positive scale is its own base
    base, mult = integer_scale_factors(per_channel)
    assert torch.equal(base, per_channel[0].float()) and bool((mult == 1).all())


def test_large_weights_keep_float_scales():
    w = _weights(n=8)
    w[0] *= 1e9  # scales beyond float16: plain ones (as weight_scales gives them), and no structure
    s = integer_group_scales(w, 64)
    assert torch.equal(s[0], weight_scales(w[:1], 4, 64, rounding="nearest")[0])
    assert integer_scale_factors(s.t().contiguous()) is None


@pytest.mark.parametrize("k,gs,rows", [(200, 64, 1024), (576, 64, 7), (256, 128, 1024)])
def test_integer_weight_codes_are_the_group_wise_weights_per_channel(k, gs, rows):
    """``q * m`` over the channel's base: every weight equal to ``q * s`` (no rounding), int8 -128 .. 120, in row
    blocks or not; float scales have no such form."""
    w = _weights(k=k)
    s = integer_group_scales(w, gs)
    q = quantize_weight(w, s, 4, gs)
    w8, base = integer_weight_codes(q, s, gs, rows=rows)
    assert w8.dtype == torch.int8 and w8.shape == q.shape and base.shape == (w.shape[0],)
    assert int(w8.min()) >= -128 and int(w8.max()) <= 120 and int(w8.min()) < -8 * 8
    assert torch.equal(w8.float() * base[:, None], dequantize_weight(q, s, gs).float())
    assert integer_weight_codes(q, weight_scales(w, 4, gs), gs) is None
