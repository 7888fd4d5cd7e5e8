"""The dp4a decode GEMV (``fptq.kernels.triton_dp4a``) under Triton's interpreter on the CPU, where its four-lane
products are computed with shifts (the PTX instruction runs only on CUDA, where ``ptx_verified`` compares the two
once per device, and ``test_triton_kernels.py``'s GPU cases run it against the reference).

Its group sums are exact integers and it adds the scaled groups in K order, so for the same tiling by whole groups
and the same split-K plan its output is the byte-wise GEMV's, bit for bit: that is what these tests hold it to.
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

INTERPRETED = importlib.util.find_spec("triton") is not None and os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(
    not INTERPRETED, reason="needs triton under its interpreter (no CUDA device); a GPU runs test_triton_kernels.py's cases")

if INTERPRETED:
    import triton
    import triton.language as tl

    from fptq.kernels.triton_dp4a import _dp4a

    @triton.jit
    def _dp4a_probe(A, B, C, D, BLOCK: tl.constexpr):
        o = tl.arange(0, BLOCK)
        tl.store(D + o, _dp4a(tl.load(A + o), tl.load(B + o), tl.load(C + o), False))


def _layer(k, n, gs, mode="dynamic_token", bias=False, integer=False, seed=0):
    from fptq.nn import QuantLinear
    from fptq.quant import quantize_weight, weight_scales
    from fptq.quant.intscales import integer_group_scales

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * (torch.rand(n, 1, generator=g) + 0.1)
    s = integer_group_scales(w, gs) if integer else weight_scales(w, 4, gs, sign="signed")
    b = torch.randn(n, generator=g) if bias else None
    return QuantLinear.from_codes(quantize_weight(w, s, 4, gs), s, wbits=4, group_size=gs, abits=8, act_mode=mode,
                                  act_scale=0.05, bias=b)


def _spec(layers, integer):
    """The layers' ``(qweight, w_scales, bias, integer scales or None)``, as the several-layers launchers take them
    (asserting that integer-scale layers were found to have them)."""
    from fptq.kernels import triton_w4a8 as tw

    ints = [tw.integer_scales_device(l) if integer else None for l in layers]
    assert all((i is not None) == integer for i in ints)
    return [(l.qweight, l.w_scales, l.bias, i) for l, i in zip(layers, ints)]


def _x(m, k, seed=1, dtype=torch.float32):
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)) * 2
    x[:, :: max(1, k // 7)] *= 8
    return x.to(dtype)


@pytest.mark.parametrize("k,n,gs,bk", [
    (200, 7, 64, 64),  # ragged last group (8 codes), odd N
    (512, 40, 128, 128),
    (1024, 33, 256, 128),  # two tiles per group
    (512, 40, 64, 128),  # two groups per tile: added one after the other
    (256, 40, -1, 64),  # one group per row: one int32 accumulator over K
])
@pytest.mark.parametrize("m,mode,split", [(1, "dynamic_token", 1), (2, "static_tensor", 1), (1, "dynamic_token", 3)])
def test_dp4a_gemv_gives_the_byte_wise_gemvs_bits(k, n, gs, bk, m, mode, split):
    from fptq.kernels import triton_w4a8 as tw

    layer = _layer(k, n, gs, mode, bias=True)
    static = layer.act_scale if mode == "static_tensor" else None
    x = _x(m, k)
    bytewise_k = gs if 0 < gs < k else 64
    if bk > bytewise_k and split > 1:
        pytest.skip("split-K chunks differ when a dp4a tile spans several groups")
    args = (layer.qweight, layer.w_scales, k, gs)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        y, s = tw.w4a8_gemv_dp4a(x, static, *args, bias=layer.bias, out_dtype=dtype,
                                 config={"BLOCK_K": bk, "SPLIT_K": split})
        ref, s_ref = tw.w4a8_gemv_quant(x, static, *args, bias=layer.bias, out_dtype=dtype,
                                        config={"BLOCK_K": bytewise_k, "SPLIT_K": split})
        assert torch.equal(s, s_ref)
        assert torch.equal(y, ref), (dtype, float((y.float() - ref.float()).abs().max()))
    # int8 codes in: the two-launch pair's bits
    qx, sx = layer.quantize_input(x)
    sx = sx.reshape(-1) if mode == "dynamic_token" else sx
    y, _ = tw.w4a8_gemv_dp4a(qx, sx, *args, bias=layer.bias, out_dtype=torch.float32,
                             config={"BLOCK_K": bk, "SPLIT_K": split})
    assert torch.equal(y, tw.w4a8_gemv(qx, sx, *args, bias=layer.bias, out_dtype=torch.float32,
                                       config={"BLOCK_K": bytewise_k, "SPLIT_K": split}))


@pytest.mark.parametrize("mode", ["dynamic_token", "static_tensor"])
def test_dp4a_gemv_with_integer_group_scales_and_default_config(mode):
    """Integer group scales: the group sums times their multipliers in one int32 accumulator (the byte-wise GEMV's
    bits); the default configuration (several groups per tile, split-K) within float32 rounding of the reference."""
    from fptq.kernels import triton_w4a8 as tw

    layer = _layer(320, 72, 64, mode, bias=True, integer=True)
    ints = tw.integer_scales_device(layer)
    assert ints is not None
    static = layer.act_scale if mode == "static_tensor" else None
    x = _x(2, 320, seed=5)
    wrong = torch.ones_like(layer.w_scales)  # the integer path reads the multipliers, not the float scales
    y, _ = tw.w4a8_gemv_dp4a(x, static, layer.qweight, wrong, 320, 64, bias=layer.bias, out_dtype=torch.float32,
                             config={"BLOCK_K": 64, "SPLIT_K": 1}, int_scales=ints)
    ref, _ = tw.w4a8_gemv_quant(x, static, layer.qweight, wrong, 320, 64, bias=layer.bias, out_dtype=torch.float32,
                                config={"BLOCK_K": 64, "SPLIT_K": 1}, int_scales=ints)
    assert torch.equal(y, ref)
    for lay, kw in ((layer, {"int_scales": ints}), (_layer(320, 72, 64, mode, bias=True), {})):
        y, _ = tw.w4a8_gemv_dp4a(x, static, lay.qweight, lay.w_scales, 320, 64, bias=lay.bias,
                                 out_dtype=torch.float32, **kw)
        r = lay.reference_forward(x)
        assert float((y - r).abs().max()) <= 1e-5 * float(r.abs().max())


def test_dp4a_lanes_are_signed_bytes():
    """The shift form of ``dp4a``: c plus the products of the four byte lanes, each a signed int8 (-128 .. 127),
    against an int64 sum over every lane value."""
    g = torch.Generator().manual_seed(3)
    lanes_a = torch.randint(-128, 128, (256, 4), generator=g)
    lanes_b = torch.randint(-128, 128, (256, 4), generator=g)
    lanes_a[0], lanes_b[0] = torch.tensor([-128, 127, -1, 0]), torch.tensor([-128, -128, -1, 5])

    a, b = _word(lanes_a), _word(lanes_b)
    c = torch.randint(-2 ** 20, 2 ** 20, (256,), generator=g, dtype=torch.int32)
    d = torch.empty(256, dtype=torch.int32)
    _dp4a_probe[(1,)](a, b, c, d, BLOCK=256)
    assert torch.equal(d.long(), c.long() + (lanes_a * lanes_b).sum(1))


def _word(lanes):
    """int32 words whose four bytes are ``lanes`` [n, 4] (signed, lane 0 the least significant byte)."""
    v = (lanes & 255).long() @ torch.tensor([1, 256, 65536, 16777216])
    return torch.where(v >= 2 ** 31, v - 2 ** 32, v).to(torch.int32)


def test_dp4a_problem_names_what_it_cannot_run():
    from fptq.kernels.triton_dp4a import dp4a_problem, w4a8_gemv_dp4a
    from fptq.quant.intscales import INT_SUM_MAX_K

    assert dp4a_problem(torch.zeros(4, 128, dtype=torch.uint8), 256, 64) is None
    assert "multiple of 8" in dp4a_problem(torch.zeros(4, 101, dtype=torch.uint8), 201, -1)
    assert "power of two" in dp4a_problem(torch.zeros(4, 96, dtype=torch.uint8), 192, 96)
    shifted = torch.zeros(4 * 128 + 1, dtype=torch.uint8)[1:].view(4, 128)
    assert "4-byte aligned" in dp4a_problem(shifted, 256, 64)
    k = INT_SUM_MAX_K + 8
    assert "int32" in dp4a_problem(torch.zeros(1, k // 2, dtype=torch.uint8), k, -1)
    assert dp4a_problem(torch.zeros(1, k // 2, dtype=torch.uint8), k, 128) is None  # int32 sums per group
    with pytest.raises(ValueError, match="multiple of 8"):
        w4a8_gemv_dp4a(torch.zeros(1, 201), None, torch.zeros(4, 101, dtype=torch.uint8),
                       torch.ones(4, 1, dtype=torch.float16), 201, -1)
    with pytest.raises(ValueError, match="int8 codes with their x_scale"):
        w4a8_gemv_dp4a(torch.zeros(1, 256, dtype=torch.int8), None, torch.zeros(4, 128, dtype=torch.uint8),
                       torch.ones(4, 4, dtype=torch.float16), 256, 64)


def test_forward_uses_the_dp4a_gemv_at_decode_where_it_covers_the_layer(monkeypatch):
    """``triton_forward`` runs the dp4a GEMV for M <= 2 (a spy counts its calls), the byte-wise one where it does
    not cover the layer (K not a multiple of 8) or with ``GEMV_DP4A`` off, with the same output bits (whole groups
    per tile by default at group 64, the same split-K plan as the byte-wise GEMV); the verification passes off CUDA."""
    from fptq.kernels import triton_w4a8 as tw

    assert tw.ptx_verified("cpu")
    calls = []
    real = tw.w4a8_gemv_dp4a

    def spy(*a, **kw):
        calls.append(a[0].shape[0])
        return real(*a, **kw)

    monkeypatch.setattr(tw, "w4a8_gemv_dp4a", spy)
    layer = _layer(256, 40, 64, "dynamic_token", bias=True)
    x = _x(1, 256)
    y = tw.triton_forward(layer, x)
    assert calls == [1]
    monkeypatch.setattr(tw, "GEMV_DP4A", False)
    y_bytewise = tw.triton_forward(layer, x)
    assert calls == [1]
    r = layer.reference_forward(x)
    assert float((y - r).abs().max()) <= 1e-5 * float(r.abs().max())
    assert float((y_bytewise - r).abs().max()) <= 1e-5 * float(r.abs().max())
    monkeypatch.setattr(tw, "GEMV_DP4A", True)
    odd = _layer(201, 9, -1, "dynamic_token")
    tw.triton_forward(odd, _x(1, 201))
    assert calls == [1]
    tw.triton_forward(layer, _x(6, 256))  # M > 2: the tensor-core kernel
    assert calls == [1]


def test_ptx_kernel_variants_compile_for_hopper(tmp_path):
    """Every flag combination the launchers can pass to the dp4a GEMV, the tensor-core kernel (one layer or several
    on one input), the W4A16 kernel and the fused decode step's kernels (fptq.kernels.triton_decode) compiles for
    sm_90
    with the inline PTX (Triton compiles for a named target without a GPU, in a process where the interpreter is
    off): the interpreter runs code the compiler refuses, and a kernel that does not build would only fall back on
    the device."""
    import json
    import subprocess
    import sys

    import triton

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("this triton wheel carries no ptxas")
    script = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "gpu_sass.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, script, "--variants", "--out", str(tmp_path)], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    recs = json.loads((tmp_path / "gpu_sass_variants.json").read_text())["variants"]
    assert {x["kernel"] for x in recs} == {"dp4a", "tensor-core", "decode", "w4a16"} and len(recs) >= 57
    assert all(x["ok"] for x in recs)


@pytest.mark.parametrize("k,n,gs", [(512, 40, 128), (200, 9, 64), (256, 40, -1), (384, 24, 128)])
@pytest.mark.parametrize("m,swap,split", [(5, False, 1), (19, True, 1), (33, False, 2), (20, True, 2)])
def test_tensor_core_byte_split_gives_the_unpacked_codes_bits(k, n, gs, m, swap, split):
    """The tensor-core kernel with float scales multiplies 16 x the codes taken from the bytes by a shift and a mask
    (two dots per tile over the even and odd columns) and scales by s / 16: the bits of the unpacked codes' single
    dot, per token and static, ragged last group, one group per row, swapped operands, split-K."""
    from fptq.kernels import triton_w4a8 as tw

    layer = _layer(k, n, gs, bias=True)
    g = torch.Generator().manual_seed(m)
    xq = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    for sx in (torch.rand(m, generator=g) * 0.1 + 0.01, torch.tensor(0.05)):
        cfg = {"SWAP_AB": swap, "SPLIT_K": split}
        y = tw.w4a8_matmul(xq, sx, layer.qweight, layer.w_scales, k, gs, bias=layer.bias, out_dtype=torch.float32,
                           config=cfg)
        ref = tw.w4a8_matmul(xq, sx, layer.qweight, layer.w_scales, k, gs, bias=layer.bias,
                             out_dtype=torch.float32, config=dict(cfg, NIBBLE=False))
        assert torch.equal(y, ref), float((y - ref).abs().max())


@pytest.mark.parametrize("k,n,gs,integer", [(512, 300, 64, False), (1024, 40, 128, True), (256, 129, -1, False)])
@pytest.mark.parametrize("m,mode", [(1, "dynamic_token"), (2, "static_tensor")])
def test_one_launch_split_k_gives_the_reduce_kernels_bits_and_resets_its_counters(k, n, gs, integer, m, mode):
    """With ``counters`` a split-K launch reduces its own partials (the last program of each tile adds them in
    split order): the two-launch result bit for bit, every counter back at zero for the next launch (a CUDA graph
    replays the same buffer), launch after launch."""
    from fptq.kernels import triton_w4a8 as tw
    from fptq.kernels.triton_dp4a import counters_needed

    layer = _layer(k, n, gs, mode, bias=n % 2 == 0, integer=integer)
    static = layer.act_scale if mode == "static_tensor" else None
    ints = tw.integer_scales_device(layer) if integer else None
    assert integer == (ints is not None)
    args = (layer.qweight, layer.w_scales, k, gs)
    cfg = {"SPLIT_K": 3}
    counters = torch.zeros(counters_needed(m, n, k, gs, cfg), dtype=torch.int32)
    for seed in (1, 2):
        x = _x(m, k, seed=seed)
        two, s2 = tw.w4a8_gemv_dp4a(x, static, *args, bias=layer.bias, out_dtype=torch.float16, config=cfg,
                                    int_scales=ints)
        one, s1 = tw.w4a8_gemv_dp4a(x, static, *args, bias=layer.bias, out_dtype=torch.float16, config=cfg,
                                    int_scales=ints, counters=counters)
        assert torch.equal(one, two) and torch.equal(s1, s2)
        assert not counters.any()
    with pytest.raises(ValueError, match="counters must be int32"):
        tw.w4a8_gemv_dp4a(_x(m, k), static, *args, config=cfg, counters=counters.long())


def test_forward_reduces_split_k_in_the_same_launch_with_counters_kept_on_the_layer(monkeypatch):
    """At decode the dispatch hands the dp4a GEMV the layer's own counters (``SERIAL_SPLIT_K``): the same output
    bits as the two-launch reduction it replaces, the counters zero after every call and reused."""
    from fptq.kernels import triton_w4a8 as tw

    assert tw.serial_split_verified("cpu")
    from fptq.kernels import triton_dp4a as td

    seen, reduces = [], []
    real, real_reduce = tw.w4a8_gemv_dp4a, td._reduce
    monkeypatch.setattr(tw, "w4a8_gemv_dp4a", lambda *a, **kw: seen.append(kw.get("counters")) or real(*a, **kw))
    monkeypatch.setattr(td, "_reduce", lambda *a, **kw: reduces.append(1) or real_reduce(*a, **kw))
    from fptq.kernels.triton_common import _split_plan

    layer = _layer(2048, 72, 128, "dynamic_token", bias=True)  # one output tile: split along K
    assert _split_plan(2, 2, 2048, 2048 // 128, 128, "cpu")[0] > 1
    x = _x(2, 2048)
    one = tw.triton_forward(layer, x)
    again = tw.triton_forward(layer, x)
    assert reduces == []  # no second launch
    monkeypatch.setattr(tw, "SERIAL_SPLIT_K", False)
    two = tw.triton_forward(layer, x)
    assert reduces == [1]
    assert seen[0] is not None and seen[1] is seen[0] and seen[2] is None
    assert not seen[0].any() and torch.equal(one, two) and torch.equal(again, two)


@pytest.mark.parametrize("m", [1, 2, 16, 24])
@pytest.mark.parametrize("mode", ["dynamic_token", "static_tensor"])
def test_forward_with_the_callers_codes_gives_the_forwards_bits(m, mode):
    """``triton_forward(codes=...)``: the codes quantize_activations makes of x, handed in by the launch that made
    x (the fused decode step's norm), give the output bits of the forward that quantizes x itself, on every path
    (the dp4a GEMV at M <= 2, the tensor-core kernel, the per-channel cache above GROUPED_MAX_M)."""
    from fptq.kernels import triton_w4a8 as tw

    layer = _layer(256, 40, 64, mode, bias=True)
    x = _x(m, 256)
    codes = tw.quantize_activations(x, layer.act_scale if mode == "static_tensor" else None)
    assert torch.equal(tw.triton_forward(layer, x, codes=codes), tw.triton_forward(layer, x))
    with pytest.raises(ValueError, match="codes must be int8"):
        tw.triton_forward(layer, x, codes=(codes[0].float(), codes[1]))


def test_device_checks_run_once_and_a_kernel_that_fails_to_build_counts_as_a_disagreement():
    """What guards the PTX forms and the one-launch split-K on a GPU (the checks themselves need one): the check
    runs once per device, its answer is kept, a False warns once, and a kernel that raises is a False."""
    import warnings

    from fptq.kernels import triton_w4a8 as tw

    runs, results = [], {}

    def disagree(dev):
        runs.append(dev)
        return False

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert tw._checked_once(results, "cuda:3", disagree, "forms differ on {dev} (test)") is False
        assert tw._checked_once(results, "cuda:3", disagree, "forms differ on {dev} (test)") is False
    assert len(runs) == 1 and sum("forms differ on cuda:3 (test)" in str(w.message) for w in caught) == 1

    def broken(dev):
        raise RuntimeError("PassManager::run failed")

    with pytest.warns(UserWarning, match="cuda:1 broken"):
        assert tw._checked_once({}, "cuda:1", broken, "{dev} broken (test)") is False
    assert tw._checked_once({}, "cpu", broken, "never") is True  # off CUDA nothing is checked


@pytest.mark.parametrize("m", [1, 20])
@pytest.mark.parametrize("mode", ["dynamic_token", "static_tensor"])
def test_w8a8_layers_run_the_int8_per_channel_kernel_not_the_reference(m, mode, monkeypatch):
    """SmoothQuant's W8A8 layers (8-bit per-channel weights) on the Triton backend: the int8 per-channel GEMM on
    their codes as stored (so a GPU's W8A8 row is a W8A8 kernel, not the float simulation), the reference's
    result to float32 rounding, with the caller's codes too; 8-bit weights with group scales keep the reference."""
    import warnings

    from fptq.kernels import triton_w4a8 as tw
    from fptq.nn import QuantLinear

    g = torch.Generator().manual_seed(3)
    w = torch.randn(48, 256, generator=g)
    s = (w.abs().amax(dim=1, keepdim=True) / 127).clamp_min(1e-8)
    codes = torch.clamp(torch.round(w / s), -127, 127).to(torch.int8)
    layer = QuantLinear.from_codes(codes, s, wbits=8, group_size=-1, abits=8, act_mode=mode, act_scale=0.05,
                                   bias=torch.randn(48, generator=g))
    x = _x(m, 256)
    calls = []
    real = tw.int8_perchannel_matmul
    monkeypatch.setattr(tw, "int8_perchannel_matmul", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    y = tw.triton_forward(layer, x)
    ref = layer.reference_forward(x)
    assert calls == [1]
    assert float((y - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    q = tw.quantize_activations(x, layer.act_scale if mode == "static_tensor" else None)
    assert torch.equal(tw.triton_forward(layer, x, codes=q), y)
    grouped = QuantLinear.from_codes(codes, s.repeat(1, 4), wbits=8, group_size=64, abits=8, act_mode=mode,
                                     act_scale=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (warned once per process)
        assert torch.equal(tw.triton_forward(grouped, x), grouped.reference_forward(x))
    assert calls == [1, 1]


@pytest.mark.parametrize("ns,k,gs,integer,bias", [
    ((96, 40, 40), 512, 64, False, True),  # q, k, v of a grouped-query layer, Qwen2's biases
    ((72, 72), 1024, 128, True, False),  # gate, up with integer group scales
    ((129, 7, 33), 256, -1, False, False),  # one group per row, ragged tiles
])
@pytest.mark.parametrize("m,mode,split", [(1, "dynamic_token", 3), (2, "static_tensor", 2)])
def test_layers_reading_one_input_in_one_launch_give_each_layers_own_bits(ns, k, gs, integer, bias, m, mode, split):
    """Two or three layers that read the same input, their output tiles side by side in one launch: each output
    the bits of that layer's own dp4a GEMV with the same split-K (float activations quantized in the launch, or
    int8 codes in), with the split reduced in the launch (counters back at zero) or in reduce launches."""
    from fptq.kernels import triton_w4a8 as tw
    from fptq.kernels.triton_dp4a import counters_needed
    from fptq.kernels.triton_dp4a_layers import w4a8_gemv_dp4a_layers

    layers = [_layer(k, n, gs, mode, bias=bias, integer=integer, seed=3 + i) for i, n in enumerate(ns)]
    spec = _spec(layers, integer)
    static = layers[0].act_scale if mode == "static_tensor" else None
    cfg = {"BLOCK_N": 32, "SPLIT_K": split}
    counters = torch.zeros(sum(counters_needed(m, n, k, gs, cfg) for n in ns), dtype=torch.int32)
    x = _x(m, k, seed=4)
    qx, sx = layers[0].quantize_input(x)
    sx = sx.reshape(-1) if mode == "dynamic_token" else sx
    for inp, s_in in ((x, static), (qx, sx)):
        alone = [tw.w4a8_gemv_dp4a(inp, s_in, qw, ws, k, gs, bias=b, out_dtype=torch.float16, config=cfg,
                                   int_scales=i) for qw, ws, b, i in spec]
        for cnt in (None, counters):
            ys, s = w4a8_gemv_dp4a_layers(inp, s_in, spec, k, gs, out_dtype=torch.float16, config=cfg, counters=cnt)
            assert [tuple(y.shape) for y in ys] == [(m, n) for n in ns]
            for y, (ref, s_ref) in zip(ys, alone):
                assert torch.equal(y, ref)
                assert torch.equal(s, s_ref)
            assert not counters.any()


def test_layers_in_one_launch_refuse_what_they_cannot_share():
    from fptq.kernels.triton_dp4a_layers import w4a8_gemv_dp4a_layers

    a, b = _layer(256, 16, 64, bias=True), _layer(256, 16, 64, bias=False)
    c = _layer(256, 16, 128)
    x = _x(1, 256)
    with pytest.raises(ValueError, match="all have a bias or none"):
        w4a8_gemv_dp4a_layers(x, None, [(a.qweight, a.w_scales, a.bias, None), (b.qweight, b.w_scales, None, None)],
                              256, 64)
    with pytest.raises(ValueError, match="differ in their number of group scales"):
        w4a8_gemv_dp4a_layers(x, None, [(b.qweight, b.w_scales, None, None), (c.qweight, c.w_scales, None, None)],
                              256, 64)
    with pytest.raises(ValueError, match="1 to 3 layers"):
        w4a8_gemv_dp4a_layers(x, None, [(b.qweight, b.w_scales, None, None)] * 4, 256, 64)


@pytest.mark.parametrize("m", [2, 5])
def test_shared_input_forward_gives_each_layers_triton_forward_and_says_when_it_cannot(m):
    """What the fused decode step calls for q/k/v: from the codes of the shared input, each output that layer's
    ``triton_forward`` (bit for bit here, where neither splits K), with the dp4a GEMV (M <= 2) or the tensor-core
    kernel (M = 3..16); None, so that each layer runs alone, above those batches or for layers that cannot share
    a launch."""
    from fptq.kernels import triton_w4a8 as tw
    from fptq.kernels.triton_shared_input import shared_input_forward, shared_input_problem

    layers = [_layer(256, n, 64, "static_tensor", bias=True, seed=n) for n in (64, 16, 16)]
    for mode_x in (torch.float32, torch.float16):
        x = _x(m, 256, seed=9, dtype=mode_x)
        codes = tw.quantize_activations(x, layers[0].act_scale, qmax=layers[0].act_qmax())
        ys = shared_input_forward(layers, x[None], codes)  # [1, M, K]: the outputs keep x's shape
        assert [tuple(y.shape) for y in ys] == [(1, m, 64), (1, m, 16), (1, m, 16)]
        for y, lay in zip(ys, layers):
            assert y.dtype == mode_x
            assert torch.equal(y[0], tw.triton_forward(lay, x, codes=codes))
    x20 = _x(20, 256)
    assert shared_input_forward(layers, x20, tw.quantize_activations(x20, layers[0].act_scale)) is None
    assert "one layer per launch" in shared_input_problem(layers, 20)
    assert "bias on some" in shared_input_problem([layers[0], _layer(256, 16, 64, "static_tensor")], 1)
    assert "group sizes differ" in shared_input_problem([layers[0], _layer(256, 16, 128, "static_tensor")], 1)
    assert "integer group scales on some" in shared_input_problem(
        [_layer(256, 16, 64, bias=True, integer=True), layers[1]], 1)
    assert "one launch runs 2 to 3" in shared_input_problem(layers[:1], 1)


@pytest.mark.parametrize("k,n,gs,integer,bias,split", [
    (512, 96, 64, False, True, 3), (1024, 72, 128, True, False, 1), (256, 40, -1, False, False, 2)])
@pytest.mark.parametrize("m,mode", [(1, "dynamic_token"), (2, "static_tensor")])
@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # SiLU of large negative sums, under numpy
def test_gate_and_up_with_silu_in_one_launch_give_the_three_launches_bits(k, n, gs, integer, bias, split, m, mode):
    """silu(gate(x)) * up(x) from x's codes in one launch (the last program of each output tile rounds both sums and
    applies SiLU x up): the bits of the gate/up GEMVs followed by the SiLU x up kernel, on the same split; the
    counters back at zero."""
    from fptq.kernels.triton_decode import silu_mul_triton
    from fptq.kernels.triton_dp4a import counters_needed
    from fptq.kernels.triton_dp4a_layers import w4a8_gemv_dp4a_glu, w4a8_gemv_dp4a_layers

    gate, up = (_layer(k, n, gs, mode, bias=bias, integer=integer, seed=s) for s in (11, 12))
    spec = _spec((gate, up), integer)
    cfg = {"BLOCK_N": 32, "SPLIT_K": split}
    counters = torch.zeros(counters_needed(m, n, k, gs, cfg) + 2, dtype=torch.int32)
    for seed in (1, 2):
        xq, sx = gate.quantize_input(_x(m, k, seed=seed))
        sx = sx.reshape(-1) if mode == "dynamic_token" else sx
        for dtype in (torch.float16, torch.bfloat16):
            g, u = w4a8_gemv_dp4a_layers(xq, sx, spec, k, gs, out_dtype=dtype, config=cfg)[0]
            got = w4a8_gemv_dp4a_glu(xq, sx, *spec, k, gs, counters, out_dtype=dtype, config=cfg)
            assert got.dtype == dtype and torch.equal(got, silu_mul_triton(g, u))
            assert not counters.any()
    with pytest.raises(ValueError, match="same shape"):
        w4a8_gemv_dp4a_glu(xq, sx, spec[0], (up.qweight[:8], up.w_scales[:8], None, None), k, gs, counters)
    with pytest.raises(ValueError, match="int8 codes"):
        w4a8_gemv_dp4a_glu(_x(m, k), sx, *spec, k, gs, counters)


def test_the_device_checks_of_the_one_launch_forms_pass_where_programs_run_in_order():
    """The comparisons a GPU runs once before using the gate/up-with-SiLU launch and the attention that combines its
    own splits: run here under the interpreter, where they must hold (a check that failed here would switch the
    forms off on every GPU)."""
    from fptq.kernels.triton_decode import _serial_combine_agrees
    from fptq.kernels.triton_shared_input import _glu_agrees

    assert _glu_agrees(torch.device("cpu"), k=512, n=64)  # (smaller than the GPU's check: interpreted)
    assert _serial_combine_agrees(torch.device("cpu"), length=320)
