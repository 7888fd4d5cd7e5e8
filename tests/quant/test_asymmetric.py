import pytest
import torch

from fptq.quant.asymmetric import (asymmetric_params, dequantize_asymmetric, fake_quantize_asymmetric,
                                   quantize_asymmetric)
from fptq.quant.weights import fake_quantize_weight


def _grid_weights(n, k, gs, g):
    """Weights on an exact Q4_1 grid, every group holding codes 0 and 15."""
    d = (torch.rand(n, k // gs, generator=g) * 0.02 + 0.001).to(torch.float16)
    m = (torch.randn(n, k // gs, generator=g) * 0.05).to(torch.float16)
    q = torch.randint(0, 16, (n, k), generator=g)
    q[:, ::gs] = 0
    q[:, 1::gs] = 15
    return dequantize_asymmetric(q.to(torch.uint8), d, m, gs), q, d, m


def test_grid_weights_come_back_exactly():
    g = torch.Generator().manual_seed(0)
    w, q, d, m = _grid_weights(8, 128, 32, g)
    d2, m2 = asymmetric_params(w, 4, 32)
    assert torch.equal(d2, d) and torch.equal(m2, m)
    assert torch.equal(quantize_asymmetric(w, d2, m2, 4, 32).long(), q)
    assert torch.equal(fake_quantize_asymmetric(w, 4, 32), w)


@pytest.mark.parametrize("k,gs", [(96, 32), (100, 32), (64, 0)])
def test_error_within_half_a_step_and_codes_in_range(k, gs):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, k, generator=g) * 0.1 + 0.03
    d, m = asymmetric_params(w, 4, gs)
    q = quantize_asymmetric(w, d, m, 4, gs)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15
    eff = k if gs <= 0 else gs
    step = d.float().repeat_interleave(eff, dim=1)[:, :k]
    err = (dequantize_asymmetric(q, d, m, gs) - w).abs()
    assert bool((err <= step / 2 + 1e-3 * step).all())


def test_ragged_group_uses_only_its_own_elements():
    g = torch.Generator().manual_seed(2)
    w = torch.rand(4, 70, generator=g) + 1.0  # all positive: zero padding would pull the min to 0
    d, m = asymmetric_params(w, 4, 32)
    d_tail, m_tail = asymmetric_params(w[:, 64:], 4, 32)
    assert torch.equal(d[:, 2:], d_tail) and torch.equal(m[:, 2:], m_tail)
    assert bool((m.float() >= 0.99).all())


def test_offset_groups_beat_the_symmetric_grid():
    g = torch.Generator().manual_seed(3)
    w = torch.rand(16, 256, generator=g)  # values in [0, 1): a symmetric grid spends half its codes on < 0
    asym = (fake_quantize_asymmetric(w, 4, 64) - w).pow(2).mean()
    sym = (fake_quantize_weight(w, 4, 64) - w).pow(2).mean()
    assert asym < 0.4 * sym


def test_clip_search_never_worse_per_group():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(8, 128, generator=g)
    w[:, 5] *= 8  # outliers the search can trade away
    plain = (fake_quantize_asymmetric(w, 4, 32) - w).pow(2).view(8, 4, 32).sum(-1)
    clipped = (fake_quantize_asymmetric(w, 4, 32, clip_search=True) - w).pow(2).view(8, 4, 32).sum(-1)
    assert bool((clipped <= plain + 1e-7).all()) and bool((clipped < plain).any())


def test_bits_out_of_range():
    with pytest.raises(ValueError, match="bits must be in 2..8"):
        quantize_asymmetric(torch.zeros(1, 4), torch.ones(1, 1), torch.zeros(1, 1), bits=9, group_size=4)
