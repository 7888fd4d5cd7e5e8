import pytest
import torch

from fptq.quant import fake_quantize_per_token, fake_quantize_weight, lae_scales
from fptq.quant.reorder import channel_order
from fptq.quant.search import best_equalization_power, quantized_output_error


def _outlier_inputs(rows=1024, k=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g)
    x[:, :4] *= 60  # a few outlier channels, as the inputs of real q/k/v and gate/up have
    return x


def test_output_error_matches_a_direct_computation():
    x = _outlier_inputs()
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(1))
    s = lae_scales(x.abs().amax(0))
    ref = x @ w.t()
    got = quantized_output_error(x, [w], [ref], s, wbits=4, group_size=32, act_mode="dynamic_token", abits=8)
    y = fake_quantize_per_token(x / s, 8) @ fake_quantize_weight(w * s, 4, 32).t()
    torch.testing.assert_close(torch.tensor(got), (y - ref).pow(2).sum() / ref.pow(2).sum(), rtol=1e-4, atol=0)


@pytest.mark.parametrize("block_rows", [7, 1024])
def test_output_error_of_sorted_channels_matches_a_direct_computation_bit_for_bit(block_rows, monkeypatch):
    """Two Linears sharing the input, channels sorted: the same number as scaling, sorting and quantizing
    every weight up front (the search quantizes a block of rows at a time, here ragged blocks of 7 too)."""
    import fptq.quant.search as search

    monkeypatch.setattr(search, "SEARCH_BLOCK_ROWS", block_rows)
    x = _outlier_inputs()
    g = torch.Generator().manual_seed(2)
    ws = [torch.randn(48, 128, generator=g), torch.randn(24, 128, generator=g)]
    s = lae_scales(x.abs().amax(0))
    refs = [x @ w.t() for w in ws]
    got = quantized_output_error(x, ws, refs, s, wbits=4, group_size=32, act_mode="dynamic_token", abits=8,
                                 reorder=True, weight_sign="signed")
    scaled = [w * s.view(1, -1) for w in ws]
    perm = channel_order(scaled)
    xq = fake_quantize_per_token(x / s, 8)[:, perm]
    want = 0.0
    for w, ref in zip(scaled, refs):
        err = (xq @ fake_quantize_weight(w[:, perm], 4, 32, sign="signed").t() - ref).pow(2).sum()
        want += float(err / ref.pow(2).sum())
    assert got == want


def test_power_zero_is_no_equalization():
    x = _outlier_inputs()
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(2))
    ref = x @ w.t()
    s = lae_scales(x.abs().amax(0))
    with_zero = quantized_output_error(x, [w], [ref], s.pow(0.0), wbits=4, group_size=32, act_mode="none")
    plain = float((x @ fake_quantize_weight(w, 4, 32).t() - ref).pow(2).sum() / ref.pow(2).sum())
    assert abs(with_zero - plain) < 1e-6 * max(plain, 1e-12) + 1e-9


def test_search_picks_the_smallest_error_and_prefers_equalizing_outliers_under_static_activations():
    x = _outlier_inputs()
    ws = [torch.randn(32, 128, generator=torch.Generator().manual_seed(i)) for i in (3, 4)]
    s = lae_scales(x.abs().amax(0))
    powers = (0.0, 0.5, 1.0)
    best, errs = best_equalization_power(x, ws, s, powers, wbits=4, group_size=32, act_mode="static_tensor",
                                         abits=8, observer="max")
    assert len(errs) == 3 and best == powers[min(range(3), key=lambda i: errs[i])]
    # with one static scale per tensor, channels 60x larger than the rest crush the others: equalizing helps
    assert best > 0 and min(errs) < errs[0]
