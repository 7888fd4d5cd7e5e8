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
