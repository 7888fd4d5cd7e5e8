"""CPU integer kernels (``int8_perchannel``, ``int8_grouped``) against
``QuantLinear.reference_forward``.

Bounds (measured on these random layers, then given ~2-5x headroom):

* activation codes and scales: bit-identical to ``QuantLinear.quantize_input``;
* ``int8_grouped``: same maths as the reference, only the float32 summation
  order differs: ``|y - ref| <= 1e-5 * (|x_deq| @ |W_deq|^T) + 1e-6``
  elementwise (measured relative errors ~1e-7);
* ``int8_perchannel``: one extra rounding of the weights (int4 group codes
  -> int8 per-channel codes): SQNR vs the reference > 35 dB (measured 39-43 dB
  on Gaussian weights); exact like the grouped path when the layer is already
  per-channel.
"""
from __future__ import annotations

import math

import pytest
import torch

from fptq.kernels import BackendUnavailableError, available_backends, default_backend, run_backend
from fptq.kernels.cpu import grouped_weight, perchannel_weight, quantize_activations
from fptq.nn import QuantLinear
from fptq.quant import quantize_weight, weight_scales

CPU_BACKENDS = ("int8_perchannel", "int8_grouped")


def make_layer(k, n, group_size, act_mode, bias=False, wbits=4, seed=0, act_scale=0.03, dtype=torch.float32,
               sign="positive"):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    s = weight_scales(w, wbits, group_size, sign=sign)
    q = quantize_weight(w, s, wbits, group_size)
    b = torch.randn(n, generator=g) if bias else None
    return QuantLinear.from_codes(
        q, s, wbits=wbits, group_size=group_size, abits=8, act_mode=act_mode,
        act_scale=act_scale, bias=b, dtype=dtype,
    )


def make_input(lead, k, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, generator=g)
    # a few outlier channels, as in real activations
    x[..., :: max(1, k // 7)] *= 8
    return x.to(dtype)


def abs_bound(layer, x):
    """``|x_deq| @ |W_deq|^T`` (+|bias|): the scale of float rounding errors."""
    x2 = x.reshape(-1, layer.in_features).float()
    if layer.act_mode != "none":
        q, s = layer.quantize_input(x2)
        x2 = q.float() * s
    out = x2.abs() @ layer.dequantized_weight().abs().t()
    if layer.bias is not None:
        out = out + layer.bias.float().abs()
    return out.reshape(*x.shape[:-1], layer.out_features)


def sqnr_db(y, ref):
    err = (y.float() - ref.float()).pow(2).sum().item()
    sig = ref.float().pow(2).sum().item()
    return math.inf if err == 0 else 10 * math.log10(sig / err)


SHAPES = [
    # (leading dims, K, N, group_size)
    ((1,), 200, 7, 64),  # M = 1, ragged last group (200 = 3*64 + 8), N odd
    ((2, 3), 200, 33, 64),  # batch dims
    ((16,), 576, 97, 128),  # ragged (576 = 4*128 + 64), N odd
    ((5,), 256, 48, 32),
    ((1, 4), 257, 9, -1),  # per-channel, K odd
    ((70,), 384, 300, 128),  # M > 64: N-blocked grouped path
]
MODES = ("static_tensor", "dynamic_token")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_codes_bit_identical(mode, dtype):
    layer = make_layer(200, 8, 64, mode, act_scale=0.05)
    x = make_input((37,), 200, dtype=dtype)
    q, s = quantize_activations(layer, x)
    qr, sr = layer.quantize_input(x)
    assert q.dtype == torch.int8
    assert torch.equal(q, qr)
    assert torch.equal(torch.as_tensor(s), torch.as_tensor(sr))
    assert int(q.abs().max()) <= 127


@pytest.mark.parametrize("sign", ["positive", "signed"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("lead,k,n,gs", SHAPES)
def test_grouped_matches_reference(lead, k, n, gs, mode, bias, sign):
    layer = make_layer(k, n, gs, mode, bias=bias, sign=sign)
    x = make_input(lead, k)
    ref = layer.reference_forward(x)
    y = run_backend("int8_grouped", layer, x)
    assert y.shape == ref.shape == (*lead, n)
    assert y.dtype == x.dtype
    tol = 1e-5 * abs_bound(layer, x) + 1e-6
    assert bool(((y - ref).abs() <= tol).all()), float(((y - ref).abs() / tol).max())
    assert (y - ref).norm() <= 1e-6 * ref.norm() + 1e-6


@pytest.mark.parametrize("sign", ["positive", "signed"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("lead,k,n,gs", SHAPES)
def test_perchannel_close_to_reference(lead, k, n, gs, mode, bias, sign):
    layer = make_layer(k, n, gs, mode, bias=bias, sign=sign)
    x = make_input(lead, k)
    ref = layer.reference_forward(x)
    y = run_backend("int8_perchannel", layer, x)
    assert y.shape == ref.shape and y.dtype == x.dtype
    if layer.w_scales.shape[1] == 1:  # per-channel layer: exact path
        tol = 1e-5 * abs_bound(layer, x) + 1e-6
        assert bool(((y - ref).abs() <= tol).all())
    else:
        assert sqnr_db(y, ref) > 35.0


@pytest.mark.parametrize("sign", ["positive", "signed"])
def test_perchannel_weight_requantization(sign):
    layer = make_layer(200, 33, 64, "static_tensor", sign=sign)
    w8, sc = perchannel_weight(layer)
    assert w8.dtype == torch.int8 and w8.shape == (33, 200) and sc.shape == (33,)
    assert int(w8.abs().max()) <= 127
    # each int8 weight is within half an int8 step of the group-scaled int4 weight
    assert bool((sc > 0).all())
    err = (w8.float() * sc[:, None] - layer.dequantized_weight()).abs()
    assert bool((err <= 0.5 * sc[:, None] * (1 + 1e-5)).all())
    # the largest-scale group's extreme code maps onto the int8 range edge
    assert int(w8.abs().amax(dim=1).min()) >= 100


def test_perchannel_is_exact_with_integer_group_scales():
    """Integer group scales re-express the group-wise weights per channel without a rounding: ``int8_perchannel``
    then computes the reference's maths (float rounding only), where float scales cost it an extra rounding."""
    from fptq.quant.intscales import integer_group_scales

    g = torch.Generator().manual_seed(3)
    w = torch.randn(40, 256, generator=g)
    x = make_input((9,), 256)
    for scales, exact in ((integer_group_scales(w, 64), True), (weight_scales(w, 4, 64), False)):
        layer = QuantLinear.from_codes(quantize_weight(w, scales, 4, 64), scales, wbits=4, group_size=64, abits=8,
                                       act_mode="dynamic_token")
        w8, sc = perchannel_weight(layer)
        assert torch.equal(w8.float() * sc[:, None], layer.dequantized_weight().float()) == exact
        y, ref = run_backend("int8_perchannel", layer, x), layer.reference_forward(x)
        tol = 1e-5 * abs_bound(layer, x) + 1e-6
        assert bool(((y - ref).abs() <= tol).all()) == exact


def test_grouped_weight_layout():
    layer = make_layer(200, 5, 64, "static_tensor")
    ranges, blocks, sT = grouped_weight(layer)
    assert ranges == [(0, 64), (64, 128), (128, 192), (192, 200)]
    assert [tuple(b.shape) for b in blocks] == [(5, 64), (5, 64), (5, 64), (5, 8)]
    assert torch.equal(torch.cat(blocks, dim=1), layer.codes())
    assert sT.shape == (4, 5) and sT.dtype == torch.float32


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("gs", [64, -1])
def test_w8_weights(backend, gs):
    layer = make_layer(200, 17, gs, "dynamic_token", bias=True, wbits=8)
    assert layer.qweight.dtype == torch.int8
    x = make_input((3, 2), 200)
    ref = layer.reference_forward(x)
    y = run_backend(backend, layer, x)
    if backend == "int8_grouped" or gs <= 0:
        tol = 1e-5 * abs_bound(layer, x) + 1e-6
        assert bool(((y - ref).abs() <= tol).all())
    else:  # 8-bit grouped codes requantized per channel
        assert sqnr_db(y, ref) > 40.0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_float_activations_w4a16(backend):
    layer = make_layer(200, 33, 64, "none", bias=True)
    x = make_input((2, 3), 200)
    ref = layer.reference_forward(x)
    y = run_backend(backend, layer, x)
    tol = 1e-5 * abs_bound(layer, x) + 1e-6
    assert bool(((y - ref).abs() <= tol).all())


@pytest.mark.parametrize("backend", CPU_BACKENDS + ("auto",))
def test_module_forward_dispatch_and_dtype(backend):
    layer = make_layer(576, 97, 128, "dynamic_token", bias=True)
    layer.set_backend(backend)
    x = make_input((2, 5), 576, dtype=torch.bfloat16)
    y = layer(x)
    ref = layer.reference_forward(x)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 5, 97)
    assert sqnr_db(y, ref) > 35.0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cache_invalidated_on_weight_change(backend):
    layer = make_layer(128, 16, 64, "static_tensor").set_backend(backend)
    x = make_input((4,), 128)
    y0 = layer(x)
    with torch.no_grad():
        layer.w_scales.mul_(2)  # in-place change (as load_state_dict does)
    layer.clear_cache()  # the reference's own cache
    y1 = layer(x)
    assert torch.allclose(y1, 2 * y0, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        layer.qweight.zero_()
    assert bool((layer(x) == 0).all())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_batch(backend):
    layer = make_layer(64, 8, 32, "dynamic_token", bias=True)
    y = run_backend(backend, layer, torch.zeros(0, 64))
    assert y.shape == (0, 8)


def test_backend_registry_errors(monkeypatch):
    layer = make_layer(64, 8, 32, "static_tensor")
    x = make_input((2,), 64)
    with pytest.raises(ValueError, match="unknown kernel backend"):
        run_backend("no_such_backend", layer, x)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # CPU tensors reach Triton only through its interpreter
    with pytest.raises(BackendUnavailableError, match="CUDA"):
        run_backend("triton", layer, x)
    avail = available_backends("cpu")
    assert {"reference", "int8_perchannel", "int8_grouped"} <= set(avail)
    # the fastest exact path this CPU has: the native AVX-512 kernels when they build, else int8_grouped
    assert default_backend("cpu") == ("native" if "native" in avail else "int8_grouped")
    assert "triton" not in avail
    assert torch.equal(run_backend("reference", layer, x), layer.reference_forward(x))
