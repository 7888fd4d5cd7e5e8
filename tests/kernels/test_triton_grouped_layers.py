"""The tensor-core grouped kernel on several layers that read one input (``fptq.kernels.triton_grouped_layers``),
under Triton's interpreter on the CPU: q/k/v side by side and gate/up with SiLU x up in one launch give the bits of
one ``w4a8_matmul`` per layer (and of the SiLU x up kernel after them), the decode batches 3-16 of the fused step.
"""
from __future__ import annotations

import pytest
import torch

from .test_triton_dp4a import INTERPRETED, _layer, _spec, _x

pytestmark = pytest.mark.skipif(
    not INTERPRETED, reason="needs triton under its interpreter (no CUDA device)")


@pytest.mark.parametrize("ns,k,gs,integer,bias", [
    ((96, 40, 40), 512, 64, False, True),  # a grouped-query layer's q, k, v with Qwen2's biases
    ((72, 72), 256, 128, True, False),  # integer group scales: the unpacking path
    ((70, 33, 33), 256, -1, False, False),  # one group per row, ragged tiles
])
@pytest.mark.parametrize("m,mode", [(3, "dynamic_token"), (16, "static_tensor")])
def test_layers_on_one_input_give_each_layers_w4a8_matmul_bits(ns, k, gs, integer, bias, m, mode):
    from fptq.kernels import triton_w4a8 as tw
    from fptq.kernels.triton_grouped_layers import w4a8_matmul_layers

    layers = [_layer(k, n, gs, mode, bias=bias, integer=integer, seed=20 + i) for i, n in enumerate(ns)]
    spec = _spec(layers, integer)
    xq, sx = layers[0].quantize_input(_x(m, k, seed=3))
    sx = sx.reshape(-1) if mode == "dynamic_token" else sx
    for dtype in (torch.float16, torch.float32):
        ys = w4a8_matmul_layers(xq, sx, spec, k, gs, out_dtype=dtype)
        assert [tuple(y.shape) for y in ys] == [(m, n) for n in ns]
        for y, (qw, ws, b, i) in zip(ys, spec):
            assert torch.equal(y, tw.w4a8_matmul(xq, sx, qw, ws, k, gs, bias=b, out_dtype=dtype, int_scales=i))


@pytest.mark.parametrize("k,n,gs,integer,bias", [(512, 96, 64, False, True), (256, 72, 128, True, False),
                                                 (256, 40, -1, False, False)])
@pytest.mark.parametrize("m,mode", [(3, "dynamic_token"), (16, "static_tensor")])
@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # SiLU of large negative sums, under numpy
def test_gate_up_with_silu_in_one_launch_gives_the_three_launches_bits(k, n, gs, integer, bias, m, mode):
    """One program per output tile computes gate's and up's tiles: SiLU x up of the two GEMMs' outputs, bit for bit,
    and with a static scale the codes SiLU x up's quantizing launch writes."""
    from fptq.kernels import triton_w4a8 as tw
    from fptq.kernels.triton_decode import silu_mul_triton
    from fptq.kernels.triton_grouped_layers import w4a8_matmul_glu

    gate, up = (_layer(k, n, gs, mode, bias=bias, integer=integer, seed=s) for s in (31, 32))
    spec = _spec((gate, up), integer)
    xq, sx = gate.quantize_input(_x(m, k, seed=4))
    sx = sx.reshape(-1) if mode == "dynamic_token" else sx
    for dtype in (torch.float16, torch.bfloat16):
        g, u = (tw.w4a8_matmul(xq, sx, qw, ws, k, gs, bias=b, out_dtype=dtype, int_scales=i) for qw, ws, b, i in spec)
        got = w4a8_matmul_glu(xq, sx, *spec, k, gs, out_dtype=dtype)
        assert got.dtype == dtype and torch.equal(got, silu_mul_triton(g, u))
        down = (torch.tensor(0.03), 8)
        act, codes, s = w4a8_matmul_glu(xq, sx, *spec, k, gs, out_dtype=dtype, quant=down)
        ref_act, ref_codes, ref_s = silu_mul_triton(g, u, down)
        assert torch.equal(act, ref_act) and torch.equal(codes, ref_codes) and float(s) == float(ref_s)


def test_tensor_core_layers_refuse_what_they_cannot_do():
    from fptq.kernels.triton_grouped_layers import w4a8_matmul_glu, w4a8_matmul_layers

    a, b = _layer(256, 32, 64, bias=True), _layer(256, 32, 64)
    xq, sx = a.quantize_input(_x(4, 256))
    spec = [(a.qweight, a.w_scales, None, None), (b.qweight, b.w_scales, None, None)]
    with pytest.raises(ValueError, match="do not split K"):
        w4a8_matmul_layers(xq, sx.reshape(-1), spec, 256, 64, config={"SPLIT_K": 2})
    with pytest.raises(ValueError, match="all have a bias or none"):
        w4a8_matmul_layers(xq, sx.reshape(-1), [(a.qweight, a.w_scales, a.bias, None), spec[1]], 256, 64)
    with pytest.raises(ValueError, match="int8 codes"):
        w4a8_matmul_layers(_x(4, 256), sx.reshape(-1), spec, 256, 64)
    with pytest.raises(ValueError, match="static scale only"):
        w4a8_matmul_glu(xq, sx.reshape(-1), *spec, 256, 64, quant=(None, 8))
    with pytest.raises(ValueError, match="same shape"):
        w4a8_matmul_glu(xq, sx.reshape(-1), spec[0], (b.qweight[:16], b.w_scales[:16], None, None), 256, 64)


@pytest.mark.parametrize("m,static_reader", [(2, False), (2, True), (6, True), (6, False)])
@pytest.mark.filterwarnings("ignore:overflow encountered in exp")
def test_glu_forward_picks_the_kernel_by_batch_and_says_when_it_cannot(m, static_reader):
    """``glu_forward``: at M <= 2 the dp4a launch (the reader quantizes in its own GEMV: no codes); at M = 3..16 the
    tensor-core launch with the reader's codes where its scale is static, and None where it is per token (SiLU x
    up's own launch quantizes then). The values: SiLU x up of the two layers' ``triton_forward``."""
    from fptq.kernels import triton_w4a8 as tw
    from fptq.kernels.triton_decode import silu_mul_triton
    from fptq.kernels.triton_shared_input import glu_forward

    gate, up = (_layer(256, 48, 64, "dynamic_token", bias=True, seed=s) for s in (41, 42))
    x = _x(m, 256, seed=6, dtype=torch.float16)
    codes = tw.quantize_activations(x)
    reader = (torch.tensor(0.02), 8) if static_reader else (None, 8)
    got = glu_forward(gate, up, x, codes, reader)
    if m > 2 and not static_reader:
        assert got is None
        return
    act, act_codes = got
    g, u = (tw.triton_forward(l, x, codes=codes) for l in (gate, up))
    want = silu_mul_triton(g, u, reader if m > 2 else None)
    if m <= 2:
        assert act_codes is None and torch.equal(act, want)
    else:
        assert torch.equal(act, want[0]) and torch.equal(act_codes[0], want[1]) and float(act_codes[1]) == float(reader[0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED, reason="needs a CUDA device (Triton compiled)")
def test_gpu_one_launch_forms_give_the_separate_launches_bits():
    """On the GPU (PTX, atomics, several programs at once): every one-launch form against the launches it replaces,
    bit for bit, at 7B-like sizes with split-K, the counters back at zero; and the device checks that gate them
    pass (they switch the forms off where they do not)."""
    from fptq.kernels import triton_w4a8 as tw
    from fptq.kernels.triton_decode import serial_attention_verified, silu_mul_triton
    from fptq.kernels.triton_dp4a_layers import w4a8_gemv_dp4a_glu, w4a8_gemv_dp4a_layers
    from fptq.kernels.triton_grouped_layers import w4a8_matmul_glu, w4a8_matmul_layers
    from fptq.kernels.triton_shared_input import glu_verified

    dev = torch.device("cuda")
    assert tw.ptx_verified(dev) and tw.serial_split_verified(dev)
    assert glu_verified(dev) and serial_attention_verified(dev)
    k, gs = 4096, 128
    for integer in (False, True):
        layers = [_layer(k, n, gs, "dynamic_token", bias=integer, integer=integer, seed=50 + i).to(dev)
                  for i, n in enumerate((4096, 1024, 1024))]
        spec = _spec(layers, integer)
        for m in (1, 2, 16):
            x = _x(m, k, seed=m).to(dev).half()
            xq, sx = tw.quantize_activations(x)
            if m <= 2:
                cfg = {"SPLIT_K": 8}
                cnt = torch.zeros(sum(tw.counters_needed(m, l.out_features, k, gs, cfg) for l in layers),
                                  dtype=torch.int32, device=dev)
                alone = [tw.w4a8_gemv_dp4a(xq, sx, *s[:2], k, gs, bias=s[2], int_scales=s[3], config=cfg)[0]
                         for s in spec]
                ys = w4a8_gemv_dp4a_layers(xq, sx, spec, k, gs, config=cfg, counters=cnt)[0]
                pair = spec[1:]  # k and v: the same shape, as gate and up
                act = w4a8_gemv_dp4a_glu(xq, sx, *pair, k, gs, cnt, config=cfg)
                assert torch.equal(act, silu_mul_triton(alone[1], alone[2])) and not cnt.any()
            else:
                alone = [tw.w4a8_matmul(xq, sx, *s[:2], k, gs, bias=s[2], int_scales=s[3]) for s in spec]
                ys = w4a8_matmul_layers(xq, sx, spec, k, gs)
                down = (torch.tensor(0.02, device=dev), 8)
                act, codes, _ = w4a8_matmul_glu(xq, sx, *spec[1:], k, gs, quant=down)
                ref = silu_mul_triton(alone[1], alone[2], down)
                assert torch.equal(act, ref[0]) and torch.equal(codes, ref[1])
            assert all(torch.equal(a, b) for a, b in zip(ys, alone)), (integer, m)
