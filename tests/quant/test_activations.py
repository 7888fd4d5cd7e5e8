import torch

from fptq.quant import fake_quantize_per_token, fake_quantize_static, quantize_per_token, quantize_static
from fptq.quant.static_scale import choose_static_scale, mse_clip


def test_static_codes_symmetric_and_clamped():
    x = torch.tensor([-1000.0, -1.0, 0.0, 0.49, 0.51, 1000.0])
    q = quantize_static(x, 1.0)
    assert q.tolist() == [-127, -1, 0, 0, 1, 127]


def test_per_token_scale_maps_row_max_to_127():
    torch.manual_seed(0)
    x = torch.randn(4, 33) * torch.tensor([[1.0], [10.0], [0.1], [100.0]])
    q, s = quantize_per_token(x)
    assert s.shape == (4, 1)
    assert (q.abs().amax(dim=1) == 127).all()
    err = (fake_quantize_per_token(x) - x).abs()
    assert bool((err <= s / 2 + 1e-6).all())


def test_fake_quant_static_error_within_half_step():
    x = torch.linspace(-3, 3, 1001)
    s = 3 / 127
    assert float((fake_quantize_static(x, s) - x).abs().max()) <= s / 2 + 1e-7


def test_mse_observer_beats_max_on_heavy_tails():
    torch.manual_seed(0)
    x = torch.randn(200_000)
    x[:5] = 60.0  # a few outliers dominate the max
    absmax = float(x.abs().max())
    s_max = choose_static_scale("max", absmax)
    s_mse = choose_static_scale("mse", absmax, sample=x)
    e_max = (fake_quantize_static(x, s_max) - x).pow(2).mean()
    e_mse = (fake_quantize_static(x, s_mse) - x).pow(2).mean()
    assert s_mse < s_max and e_mse < e_max


def test_mse_clip_keeps_max_for_uniform_data():
    x = torch.linspace(-1, 1, 100_001)
    assert abs(mse_clip(x, 1.0) - 1.0) < 0.05


def test_mean_max_and_percentile_observers():
    wm = torch.tensor([1.0, 2.0, 3.0])
    assert abs(choose_static_scale("mean_max", 3.0, window_maxes=wm) - 2.0 / 127) < 1e-9
    x = torch.arange(10001, dtype=torch.float32) / 10000
    s = choose_static_scale("percentile", 1.0, sample=x, percentile=50.0)
    assert abs(s * 127 - 0.5) < 1e-3


def _sink_case():
    """Inputs like an LLM's after LAE: ordinary tokens around one unit, and one sink token in 2000 whose
    channel 0 is 60x larger; the consumer's weights read channel 0 strongly (its outputs depend on it)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8000, 64, generator=g)
    x[::2000, 0] = 60.0
    w = torch.randn(96, 64, generator=g) / 8
    w[:, 0] *= 10
    return x, w


def _output_error(x, w, scale):
    return float(((fake_quantize_static(x, scale) - x) @ w.t()).pow(2).sum())


def test_output_observer_never_worse_than_max_and_matches_a_dense_search():
    from fptq.quant.static_scale import output_clip_scale

    x, w = _sink_case()
    absmax = float(x.abs().max())
    s_out = output_clip_scale(x, w, absmax)
    e_out = _output_error(x, w, s_out)
    assert e_out <= _output_error(x, w, absmax / 127) + 1e-9  # the max is one of the candidates
    dense = min(_output_error(x, w, c / 127) for c in torch.linspace(0.05 * absmax, absmax, 400).tolist())
    assert e_out <= dense * 1.02
    # both branches of the error (Gram matrix when N > K, direct product otherwise) agree
    assert output_clip_scale(x, w[:32], absmax) > 0
    assert abs(choose_static_scale("output", absmax, sample=x, weight=w) - s_out) < 1e-12


def test_mse_observer_clips_the_sink_token_and_the_output_observer_does_not():
    """The root cause of fptq's static-activation loss on Qwen2.5 (bench/results/static_act_diagnosis_qwen.md):
    the clip that minimises the activations' squared error clips the rare sink tokens; scored on the
    layer output, their error is weighed by what it does to the output."""
    x, w = _sink_case()
    absmax = float(x.abs().max())
    s_mse = choose_static_scale("mse", absmax, sample=x)
    s_out = choose_static_scale("output", absmax, sample=x, weight=w)
    assert s_mse * 127 < 0.7 * absmax  # the mse clip cuts the sink channel by over 30%
    e_sink_mse = _output_error(x[::2000], w, s_mse)
    e_sink_out = _output_error(x[::2000], w, s_out)
    assert e_sink_out < 0.01 * e_sink_mse
    assert _output_error(x, w, s_out) < 0.5 * _output_error(x, w, s_mse)


def test_output_observer_needs_weights():
    import pytest

    x, _ = _sink_case()
    with pytest.raises(ValueError, match="weights"):
        choose_static_scale("output", 1.0, sample=x)


def test_mse_sink_observer_never_clips_below_the_floor():
    x, _ = _sink_case()
    absmax = float(x.abs().max())
    s_mse = choose_static_scale("mse", absmax, sample=x)
    assert choose_static_scale("mse_sink", absmax, sample=x, floor=0.0) == s_mse
    assert abs(choose_static_scale("mse_sink", absmax, sample=x, floor=absmax) * 127 - absmax) < 1e-9
    assert abs(choose_static_scale("mse_sink", absmax, sample=x, floor=2 * absmax) * 127 - absmax) < 1e-9
    mid = 0.5 * (s_mse * 127 + absmax)
    assert abs(choose_static_scale("mse_sink", absmax, sample=x, floor=mid) * 127 - mid) < 1e-9
