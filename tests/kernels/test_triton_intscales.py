"""The Triton kernels' integer-group-scale path (``int_scales``), under Triton's interpreter on the CPU (on a GPU
machine: ``test_triton_kernels.py``'s GPU cases run it).

With group scales ``base[n] * m[n, g]`` the packed kernels multiply the codes by ``m``, sum all of K in one int32
accumulator and scale by ``base`` once, so without split-K their output is bit for bit the exact integer sum
converted to float32 and scaled in the kernel's order. The kernels must read the multipliers and the base, not
the float scales (given wrong float scales here), and ``triton_forward`` must hand them the factors it finds.
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs triton under its interpreter (no CUDA device); a GPU runs test_triton_kernels.py's cases")


def _layer(k, n, gs, mode, bias, seed=0):
    from fptq.nn import QuantLinear
    from fptq.quant import quantize_weight
    from fptq.quant.intscales import integer_group_scales

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * (torch.rand(n, 1, generator=g) + 0.1)
    s = integer_group_scales(w, gs)
    b = torch.randn(n, generator=g) if bias else None
    return QuantLinear.from_codes(quantize_weight(w, s, 4, gs), s, wbits=4, group_size=gs, abits=8, act_mode=mode,
                                  act_scale=0.05, bias=b)


def _expected(layer, qx, sx, base, mult, dtype):
    """float32(exact integer sum) * base * activation scale (+ bias), cast: the kernel's order."""
    gs = layer.group_size
    wm = layer.codes().long() * mult.long().repeat_interleave(gs, dim=1)[:, :layer.in_features]
    acc = (qx.long() @ wm.t()).float() * base[None, :]
    acc = acc * (sx.reshape(-1, 1) if sx.dim() > 0 else sx)
    if layer.bias is not None:
        acc = acc + layer.bias.float()
    return acc.to(dtype)


@pytest.mark.parametrize("mode", ["dynamic_token", "static_tensor"])
@pytest.mark.parametrize("m,kernel,config", [
    (1, "gemv", {"SPLIT_K": 1}), (2, "gemv", {"SPLIT_K": 1, "BLOCK_N": 64}),
    (5, "gemm", {"SPLIT_K": 1, "SWAP_AB": True}), (19, "gemm", {"SPLIT_K": 1, "SWAP_AB": False}),
])
def test_integer_path_is_the_exact_integer_sum_and_reads_the_multipliers(m, kernel, config, mode):
    from fptq.kernels import triton_w4a8 as tw

    layer = _layer(320, 72, 64, mode, bias=True)
    base, mult = tw.integer_scales_device(layer)
    assert mult.shape == layer.w_scales.shape and mult.dtype == torch.int8 and base.dtype == torch.float32
    x = torch.randn(m, 320, generator=torch.Generator().manual_seed(m)) * 3
    qx, sx = layer.quantize_input(x)
    sx = sx.reshape(-1) if mode == "dynamic_token" else sx
    wrong = torch.ones_like(layer.w_scales)  # the integer path must not read the float scales
    call = tw.w4a8_gemv if kernel == "gemv" else tw.w4a8_matmul
    for dtype in (torch.float32, torch.float16):
        y = call(qx, sx, layer.qweight, wrong, 320, 64, bias=layer.bias, out_dtype=dtype, config=config,
                 int_scales=(base, mult))
        assert torch.equal(y, _expected(layer, qx, sx, base, mult, dtype)), (kernel, dtype)
    if kernel == "gemv":  # quantizing inside the GEMV: the same bits
        y, _ = tw.w4a8_gemv_quant(x, layer.act_scale if mode == "static_tensor" else None, layer.qweight, wrong,
                                  320, 64, bias=layer.bias, out_dtype=torch.float32, config=config,
                                  int_scales=(base, mult))
        assert torch.equal(y, _expected(layer, qx, sx, base, mult, torch.float32))


def test_forward_hands_the_factors_to_the_packed_kernels(monkeypatch):
    """``triton_forward`` finds integer scales at first use and passes them to the GEMV (the dp4a one at decode, the
    byte-wise one with it switched off) and the tensor-core kernel (a spy records the calls); float-scaled layers
    get none; split-K results stay within float rounding of the reference."""
    from fptq.kernels import triton_w4a8 as tw

    seen = []
    for name in ("w4a8_gemv_dp4a", "w4a8_gemv_quant", "w4a8_matmul"):
        real = getattr(tw, name)

        def spy(*a, _real=real, _name=name, **kw):
            seen.append((_name, kw.get("int_scales") is not None))
            return _real(*a, **kw)

        monkeypatch.setattr(tw, name, spy)
    layer = _layer(256, 40, 64, "dynamic_token", bias=False)
    for m in (1, 6):
        x = torch.randn(m, 256, generator=torch.Generator().manual_seed(m))
        y, ref = tw.triton_forward(layer, x, path="grouped"), layer.reference_forward(x)
        assert float((y - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    assert seen == [("w4a8_gemv_dp4a", True), ("w4a8_matmul", True)]
    seen.clear()
    monkeypatch.setattr(tw, "GEMV_DP4A", False)
    tw.triton_forward(layer, torch.randn(1, 256), path="grouped")
    assert seen == [("w4a8_gemv_quant", True)]
    from fptq.nn import QuantLinear

    plain = QuantLinear.from_codes(layer.codes(), layer.w_scales.float() * 1.001, wbits=4, group_size=64, abits=8,
                                   act_mode="dynamic_token")
    assert tw.integer_scales_device(plain) is None and tw.integer_scales_device(layer) is not None
    seen.clear()
    tw.triton_forward(plain, torch.randn(6, 256), path="grouped")
    assert seen == [("w4a8_matmul", False)]


def test_integer_scales_are_refused_past_the_int32_bound():
    from fptq.kernels import triton_w4a8 as tw
    from fptq.quant.intscales import INT_SUM_MAX_K

    k = INT_SUM_MAX_K + 1
    qw = torch.zeros(1, (k + 1) // 2, dtype=torch.uint8)
    ws = torch.ones(1, -(-k // 64), dtype=torch.float16)
    ints = (torch.ones(1), torch.ones(ws.shape, dtype=torch.int8))
    with pytest.raises(ValueError, match="int32"):
        tw.w4a8_matmul(torch.zeros(1, k, dtype=torch.int8), torch.ones(()), qw, ws, k, 64, int_scales=ints)
    with pytest.raises(ValueError, match="multipliers int8"):
        tw.w4a8_matmul(torch.zeros(1, 128, dtype=torch.int8), torch.ones(()), qw[:, :64], ws[:, :2], 128, 64,
                       int_scales=(torch.ones(1), torch.ones(1, 2)))
