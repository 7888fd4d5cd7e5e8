"""The W4A16 tensor-core kernel (``fptq.kernels.triton_w4a16``) under Triton's interpreter on the CPU: the
reference's values (float32 products of the exact codes, group scales after each group) to float32 summation
order, every grouping and split; and the ``triton`` backend's dispatch of float-activation layers to it."""
from __future__ import annotations

import pytest
import torch

from .test_triton_dp4a import INTERPRETED, _x

pytestmark = pytest.mark.skipif(not INTERPRETED, reason="needs triton under its interpreter (no CUDA device)")


def _w4a16(k, n, gs, bias, seed=0):
    from fptq.nn import QuantLinear
    from fptq.quant import quantize_weight, weight_scales

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * (torch.rand(n, 1, generator=g) + 0.1)
    s = weight_scales(w, 4, gs, sign="signed")
    return QuantLinear.from_codes(quantize_weight(w, s, 4, gs), s, wbits=4, group_size=gs, abits=16,
                                  act_mode="none", bias=torch.randn(n, generator=g) if bias else None)


@pytest.mark.parametrize("k,n,gs,bias", [(256, 72, 64, True), (200, 33, 64, False), (512, 96, 128, True),
                                         (160, 40, -1, False)])
@pytest.mark.parametrize("m,split", [(1, None), (5, 2), (20, 1), (70, None)])
def test_w4a16_matmul_is_the_reference(k, n, gs, bias, m, split):
    from fptq.kernels.triton_w4a16 import w4a16_matmul

    layer = _w4a16(k, n, gs, bias)
    x = _x(m, k, seed=2)
    ref = layer.reference_forward(x)
    y = w4a16_matmul(x, layer.qweight, layer.w_scales, k, gs, bias=layer.bias, config={"SPLIT_K": split})
    assert y.dtype == torch.float32 and y.shape == (m, n)
    assert float((y - ref).abs().max()) <= 2e-5 * float(ref.abs().max())
    # float16 (bfloat16 on the GPU only: Triton 3.7's interpreter multiplies bfloat16 tiles wrongly)
    xh = x.half()
    got = w4a16_matmul(xh, layer.qweight, layer.w_scales, k, gs, bias=layer.bias)
    want = layer.reference_forward(xh)  # float32 maths on the same 16-bit inputs, rounded at the end
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), want.float(), atol=1e-3 * float(want.float().abs().max()), rtol=2e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED, reason="needs a CUDA device (Triton compiled)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpu_w4a16_matmul_is_the_reference(dtype):
    from fptq.kernels.triton_w4a16 import w4a16_matmul

    for k, n, gs in ((4096, 1024, 128), (1024, 200, -1)):
        layer = _w4a16(k, n, gs, True).cuda()
        for m in (1, 16, 300):
            x = _x(m, k, seed=m).cuda().to(dtype)
            got = w4a16_matmul(x, layer.qweight, layer.w_scales, k, gs, bias=layer.bias)
            want = layer.reference_forward(x)
            tol = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
            torch.testing.assert_close(got.float(), want.float(), atol=tol * float(want.float().abs().max()),
                                       rtol=tol)


def test_the_triton_backend_runs_w4a16_layers_on_the_kernel_not_the_reference(monkeypatch):
    from fptq.kernels import triton_w4a8 as tw

    layer = _w4a16(256, 48, 64, True).set_backend("triton")
    calls = []
    real = tw.w4a16_matmul
    monkeypatch.setattr(tw, "w4a16_matmul", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setattr(tw, "_fallback", lambda *a, **kw: pytest.fail("the reference path ran"))
    x = _x(6, 256, seed=4).to(torch.float16).reshape(2, 3, 256)
    y = layer(x)
    assert calls and y.shape == (2, 3, 48) and y.dtype == torch.float16
    want = layer.reference_forward(x).float()
    torch.testing.assert_close(y.float(), want, atol=1e-3 * float(want.abs().max()), rtol=2e-3)


def test_w4a16_refuses_what_it_cannot_run():
    from fptq.kernels.triton_w4a16 import w4a16_matmul, w4a16_problem

    layer = _w4a16(256, 16, 64, False)
    assert "multiple of 32" in w4a16_problem(layer.qweight, 256, 48)
    with pytest.raises(ValueError, match="float16/bfloat16/float32"):
        w4a16_matmul(torch.zeros(2, 256, dtype=torch.int8), layer.qweight, layer.w_scales, 256, 64)
    with pytest.raises(ValueError, match="not packed"):
        w4a16_matmul(torch.zeros(2, 256), layer.qweight[:, :10], layer.w_scales, 256, 64)
