"""fptq's native CPU kernels (AVX-512 VNNI and AVX2 builds, built at first use) against the torch reference maths.

The tests that take the ``build`` fixture run once per build the CPU supports (an AVX-512 CPU runs both)."""
import pytest
import torch

from fptq.kernels import native

from ..conftest import sqnr_db, use_native_build
from fptq.nn import QuantLinear
from fptq.quant import (dequantize_weight, pack_int4, pack_int4_vnni, quantize_per_token, quantize_static,
                        unpack_int4_vnni, vnni_padded_shape)

needs_native = pytest.mark.skipif(not native.available(), reason=f"native kernels unavailable: {native.unavailable_reason()}")


@pytest.fixture(autouse=True)
def _default_build_after():
    """After each test (and after its monkeypatch has restored ``FPTQ_NATIVE``), forget the loaded build, so
    that a test that loaded another one does not leave it to every later test of the session (the AMX paths of
    tests/runtime ran on the avx512_vnni build after this file until this fixture existed)."""
    yield
    native._load.cache_clear()
    native.has_bf16.cache_clear()


@pytest.fixture(params=[b.isa for b in native.BUILDS])
def build(request, monkeypatch):
    use_native_build(monkeypatch, request.param)
    yield request.param
    monkeypatch.undo()
    native._load.cache_clear()
    native.has_bf16.cache_clear()


def _weights(n, k, gs, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=g)
    groups = -(-k // gs)
    s = (torch.rand(n, groups, generator=g) * 0.01 + 1e-3)
    s = torch.where(torch.rand(n, groups, generator=g) < 0.5, -s, s).half()  # either sign (the signed-extreme rule)
    np_, _ = vnni_padded_shape(n, k)
    ws = torch.zeros(groups, np_, dtype=torch.float16)
    ws[:, :n] = s.t()
    return q, s, pack_int4_vnni(q), ws


@pytest.mark.parametrize("n,k", [(16, 8), (48, 200), (37, 61), (1536, 576)])
def test_vnni_pack_roundtrip_and_size(n, k):
    q = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=torch.Generator().manual_seed(n))
    p = pack_int4_vnni(q)
    assert torch.equal(unpack_int4_vnni(p, n, k), q)
    np_, kp = vnni_padded_shape(n, k)
    assert p.numel() == np_ * kp // 2  # half a byte per code, like the checkpoint layout


def test_vnni_layout_matches_its_definition():
    q = torch.randint(-8, 8, (32, 24), dtype=torch.int8, generator=torch.Generator().manual_seed(1))
    p = pack_int4_vnni(q)
    nb, kb, r, j = 1, 2, 5, 3
    byte = int(p[nb, kb, 4 * r + j])
    assert (byte & 0xF) - 8 == int(q[16 * nb + r, 8 * kb + j])
    assert (byte >> 4) - 8 == int(q[16 * nb + r, 8 * kb + 4 + j])


def test_vnni_pack_rejects_out_of_range_codes():
    with pytest.raises(ValueError, match="-8..7"):
        pack_int4_vnni(torch.full((16, 8), 9, dtype=torch.int8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,k,gs", [(1, 576, 64), (7, 61, 64), (33, 200, 64), (5, 1000, 32), (5, 1000, 128)])
def test_native_quantize_is_bit_identical_to_the_reference(dtype, m, k, gs, build):
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(k)) * 5).to(dtype)
    x[0, 3] = 0.5 * 0.04  # a tie: round half to even, as torch.round
    x[-1, 3 * k // 4] = -40.0  # the last row's extreme, past its first block of 64 values
    kp = vnni_padded_shape(16, k)[1]
    groups = -(-k // gs)
    xq, xs, sx = native.quantize(x, kp, "dynamic_token", None, 127, gs, groups)
    ref, rs = quantize_per_token(x)
    assert torch.equal(xq[:, :k], ref) and torch.equal(sx, rs[:, 0]) and not xq[:, k:].any()
    assert torch.equal(xs, torch.stack([ref[:, g * gs:(g + 1) * gs].int().sum(1) for g in range(groups)], 1))
    scale = torch.tensor(0.04)
    xq, _, sx = native.quantize(x, kp, "static_tensor", scale, 127, gs, groups)
    assert torch.equal(xq[:, :k], quantize_static(x, scale)) and torch.all(sx == 0.04)


def _near_code_boundaries(scale: float, n: int, seed: int) -> torch.Tensor:
    """Values within a few float32 ulps of ``(c + 0.5) * scale`` and ``c * scale`` (c in 0 .. 300, either sign, none
    zero):
    where a quotient a hair off IEEE division's would change a code."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randint(1, 301, (n,), generator=g).float() - 0.5 * torch.randint(0, 2, (n,), generator=g).float()
    v = (c * scale).float()
    bits = v.view(torch.int32) + torch.randint(-3, 4, (n,), generator=g, dtype=torch.int32)
    v = bits.view(torch.float32)
    return torch.where(torch.rand(n, generator=g) < 0.5, -v, v)


@pytest.mark.parametrize("scale", [0.04, 3.0517578e-05, 1.7e-3, 123.456, 1e-30, 1e-36])
def test_native_quantize_is_ieee_division_near_every_code_boundary(scale, build):
    """The codes are round(x / scale) with IEEE division's quotient (torch's), also for values a few ulps from a
    half-integer or integer quotient, past the int8 range and at scales where the kernel divides after all (below
    2^-100): the AVX-512 builds compute the quotient from the scale's reciprocal with a fused correction, which
    must give the same bits."""
    x = _near_code_boundaries(scale, 64 * 1000, seed=int(scale * 1e6) % 1000).reshape(64, 1000)
    x[0, :5] = torch.tensor([0.0, -0.0, 1e30, -1e30, 3e38])
    gs, kp = 64, vnni_padded_shape(16, 1000)[1]
    xq, _, _ = native.quantize(x, kp, "static_tensor", torch.tensor(scale), 127, gs, -(-1000 // gs))
    assert torch.equal(xq[:, :1000], quantize_static(x, torch.tensor(scale)))
    # per token: each row's scale is its absmax / 127, so the row's largest values sit on the top codes' boundaries
    xd = x.clone()
    xd[:, 0] = (127 * scale * (1 + torch.arange(64) / 640)).float()
    xq, _, sx = native.quantize(xd, kp, "dynamic_token", None, 127, gs, -(-1000 // gs))
    ref, rs = quantize_per_token(xd)
    assert torch.equal(xq[:, :1000], ref) and torch.equal(sx, rs[:, 0])


@pytest.mark.parametrize("m,k,n,gs", [(1, 576, 1536, 64), (5, 200, 40, 64), (9, 576, 192, 128), (70, 64, 96, 32),
                                      (300, 128, 48, 128)])
@pytest.mark.parametrize("mode", ["static_tensor", "dynamic_token"])
def test_w4a8_gemm_matches_the_reference_maths(m, k, n, gs, mode, build):
    q, s, p, ws = _weights(n, k, gs)
    bias = torch.randn(n)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 3
    kp, groups = p.shape[1] * 8, ws.shape[0]
    scale = torch.tensor(0.03)
    xq, xs, sx = native.quantize(x, kp, mode, scale, 127, gs, groups)
    xr, sr = (quantize_static(x, scale), scale) if mode == "static_tensor" else quantize_per_token(x)
    ref = (xr.float() * sr) @ dequantize_weight(q, s, gs).t() + bias
    out = torch.empty(m, n)
    native.W4A8Gemm([(p, ws, bias, n)], gs)(xq, xs, sx, [out])
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_w4a8_multi_gemm_writes_column_slices_and_accumulates(build):
    k, gs = 128, 64
    mats, refs = [], []
    x = torch.randn(4, k)
    for i, n in enumerate((64, 32, 32)):
        q, s, p, ws = _weights(n, k, gs, seed=i)
        mats.append((p, ws, None, n))
        refs.append((q, s))
    gemm = native.W4A8Gemm(mats, gs)
    xq, xs, sx = native.quantize(x, k, "dynamic_token", None, 127, gs, 2)
    xr, sr = quantize_per_token(x)
    buf = torch.ones(4, 128)
    gemm(xq, xs, sx, [buf[:, :64], buf[:, 64:96], buf[:, 96:]], accumulate=True)
    ref = torch.cat([(xr.float() * sr) @ dequantize_weight(q, s, gs).t() for q, s in refs], 1) + 1
    assert (buf - ref).abs().max() <= 1e-5 * ref.abs().max()
    out16 = torch.zeros(4, 128, dtype=torch.bfloat16)
    gemm(xq, xs, sx, [out16[:, :64], out16[:, 64:96], out16[:, 96:]])
    assert (out16.float() - (ref - 1)).abs().max() <= 2 ** -8 * (ref - 1).abs().max()  # bf16 rounding of the output


def test_w4a16_gemm_and_dequantize(build):
    n, k, gs = 80, 200, 64
    q, s, p, ws = _weights(n, k, gs)
    w = dequantize_weight(q, s, gs)
    assert torch.equal(native.dequantize_w4(p, ws, n, k, gs), w.to(torch.bfloat16))
    x = torch.randn(3, k)
    out = torch.empty(3, n)
    native.W4A16Gemm([(p, ws, None, n)], gs)(torch.nn.functional.pad(x, (0, p.shape[1] * 8 - k)), [out])
    ref = x @ w.t()
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_fused_stages_match_torch(build):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 100, generator=g) * 4, torch.rand(100, generator=g) + 0.5
    ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    out = native.rmsnorm(x, w, 1e-5)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6)
    q = native.QuantOut.make(5, 104, "dynamic_token", None, 127, 32, 4)
    native.rmsnorm(x, w, 1e-5, quant=q)
    assert torch.equal(q.tensors[0][:, :100], quantize_per_token(out)[0])
    gu = torch.randn(5, 2 * 70, generator=g) * 6
    act = native.silu_mul(gu, 70)
    assert torch.allclose(act, torch.nn.functional.silu(gu[:, :70]) * gu[:, 70:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("m,k,n,gs,mode", [
    (100, 576, 70, 64, "static_tensor"),   # AMX tiles (6) then 4 tail rows; a partial last channel block
    (37, 256, 96, 32, "dynamic_token"),    # 32-deep tiles, 5 tail rows
    (5, 128, 48, 64, "dynamic_token"),     # fewer rows than a tile
    (40, 200, 64, 64, "static_tensor"),    # a last group of 8: no tile depth fits, every row through the buffer
    (500, 2304, 40, 128, "dynamic_token"),  # a large K
])
def test_fused_gate_up_silu_gives_the_unfused_bits(m, k, n, gs, mode, build):
    """W4A8Gemm.glu (silu(gate) * up as the products leave the kernel) against the gate/up products written out
    and native.silu_mul: the same bits, in every build that has it; the buffer rows it does not need are left
    alone."""
    _, _, p1, w1 = _weights(n, k, gs, seed=1)
    _, _, p2, w2 = _weights(n, k, gs, seed=2)
    gemm = native.W4A8Gemm([(p1, w1, torch.randn(n), n), (p2, w2, torch.randn(n), n)], gs)
    if not gemm.has_glu:
        assert build == "avx2"
        with pytest.raises(ValueError, match="AVX-512 build"):
            gemm.glu(*native.quantize(torch.randn(m, k), p1.shape[1] * 8, "dynamic_token", None, 127, gs,
                                      w1.shape[0]), [torch.empty(m, n)] * 2, torch.empty(m, n))
        return
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 3
    xq, xs, sx = native.quantize(x, p1.shape[1] * 8, mode, torch.tensor(0.05) if mode == "static_tensor" else None,
                                 127, gs, w1.shape[0])
    gu = torch.empty(m, 2 * n)
    gemm(xq, xs, sx, [gu[:, :n], gu[:, n:]])
    ref = native.silu_mul(gu, n)
    buf, act = torch.empty(m, 2 * n), torch.full((m, n), float("nan"))
    assert gemm.glu(xq, xs, sx, [buf[:, :n], buf[:, n:]], act) is act
    assert torch.equal(act, ref)
    with pytest.raises(ValueError, match="act must be"):
        gemm.glu(xq, xs, sx, [buf[:, :n], buf[:, n:]], torch.empty(m, n + 1))
    got = _glu_static_codes_match_silu_mul(gemm, xq, xs, sx, gu, [buf[:, :n], buf[:, n:]])
    assert torch.equal(got.tensors[0][:, :n], quantize_static(ref, torch.tensor(0.03)))  # torch's division
    with pytest.raises(ValueError, match="only a static quantizer"):
        gemm.glu(xq, xs, sx, [buf[:, :n], buf[:, n:]], act,
                 quant=native.QuantOut.make(m, got.Kp, "dynamic_token", None, 127, 32, got.G))


def _glu_static_codes_match_silu_mul(gemm, xq, xs, sx, gu, outs):
    """down_proj's static quantizer fed by the fused gate/up: the codes (zero padded past n), group sums and
    scales equal what native.silu_mul writes from the products gu; returns the kernel's QuantOut."""
    m, n = gu.shape[0], gu.shape[1] // 2
    kp2, g2 = -(-n // 8) * 8, -(-n // 32)
    want = native.QuantOut.make(m, kp2, "static_tensor", 0.03, 127, 32, g2)
    native.silu_mul(gu, n, quant=want)
    got = native.QuantOut.make(m, kp2, "static_tensor", 0.03, 127, 32, g2)
    for t in got.tensors:
        t.fill_(7)
    assert gemm.glu(xq, xs, sx, outs, None, quant=got) is None
    for a, b in zip(got.tensors, want.tensors):
        assert torch.equal(a, b)
    return got


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hd", [16, 64, 80])
def test_rope_and_cache_write(cache_dtype, hd, build):
    """Rotated queries and keys with torch's float steps (x cos + rotate_half(x) sin, each product rounded: the
    same bits), the values as they are, each at its place in the caches."""
    b, t, h, hkv, start, length = 2, 3, 4, 2, 5, 12
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(b * t, (h + 2 * hkv) * hd, generator=g)
    ang = torch.rand(t, hd // 2, generator=g) * 6
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    q = torch.empty(b, h, t, hd)
    kc, vc = torch.zeros(b, hkv, length, hd, dtype=cache_dtype), torch.zeros(b, hkv, length, hd, dtype=cache_dtype)
    native.rope_cache(qkv, b, t, h, hkv, hd, cos, sin, q, kc, vc, start)

    def rope(x):  # [B, T, H, D]
        rot = torch.cat((-x[..., hd // 2:], x[..., :hd // 2]), -1)
        return x * cos[:, None] + rot * sin[:, None]

    qr = rope(qkv[:, :h * hd].view(b, t, h, hd)).transpose(1, 2)
    kr = rope(qkv[:, h * hd:(h + hkv) * hd].view(b, t, hkv, hd)).transpose(1, 2)
    vr = qkv[:, (h + hkv) * hd:].view(b, t, hkv, hd).transpose(1, 2)
    assert torch.equal(q, qr)
    assert torch.equal(kc[:, :, start:start + t], kr.to(cache_dtype))
    assert torch.equal(vc[:, :, start:start + t], vr.to(cache_dtype))
    assert not kc[:, :, :start].any() and not vc[:, :, start + t:].any()


def test_quantlinear_native_backend_keeps_one_copy_and_saves_the_checkpoint_layout(build):
    q, s, _, _ = _weights(48, 100, 32)
    lin = QuantLinear.from_codes(q, s, wbits=4, group_size=32, abits=8, act_mode="dynamic_token",
                                 bias=torch.randn(48))
    x = torch.randn(3, 100)
    ref = lin(x)
    canonical = lin.qweight.clone()
    lin.set_backend("native")
    y = lin(x)
    assert lin.weight_layout == "vnni" and lin.qweight.numel() == vnni_padded_shape(48, 100)[0] * 104 // 2
    assert (y - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert torch.equal(lin.codes(), q)
    sd = lin.state_dict()
    assert torch.equal(sd["qweight"], canonical) and torch.equal(sd["qweight"], pack_int4(q))
    fresh = QuantLinear(100, 48, group_size=32, act_mode="dynamic_token", bias=True)
    fresh.set_backend("native")
    fresh(x)  # repacks its zero weights
    fresh.load_state_dict(sd)
    assert fresh.weight_layout == "rowpair" and torch.equal(fresh(x), y)


def test_native_kernels_build_where_the_cpu_supports_them():
    """A build failure must fail the suite, not skip every native test: on an x86-64 Linux CPU with AVX-512
    VNNI, or with AVX2, FMA and F16C, and a C compiler, the kernels must be available, the best build chosen."""
    import os
    import platform

    flags = set(open("/proc/cpuinfo").read().split()) if os.path.exists("/proc/cpuinfo") else set()
    if platform.machine() != "x86_64" or native._compiler() is None:
        pytest.skip("not an x86-64 machine with a C compiler")
    if os.environ.get("FPTQ_NATIVE", "1") != "1":
        pytest.skip("FPTQ_NATIVE is set")
    if {"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "amx_tile", "amx_int8"} <= flags:
        want = "avx512_amx"
    elif {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= flags:
        want = "avx512_vnni"
    elif {"avx2", "fma", "f16c"} <= flags:
        want = "avx2"
    else:
        pytest.skip("neither AVX-512 VNNI nor AVX2")
    assert native.available(), native.unavailable_reason()
    assert native.isa() == want


def test_an_unknown_native_setting_is_refused_with_the_choices(monkeypatch, caplog):
    monkeypatch.setenv("FPTQ_NATIVE", "avx9")
    native._load.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="fptq.kernels.native"):
            assert not native.available()
        assert "avx9" in native.unavailable_reason() and "avx2" in native.unavailable_reason()
        assert any("avx9" in r.message for r in caplog.records)  # said once, not only on request
    finally:
        monkeypatch.undo()
        native._load.cache_clear()


def test_the_avx2_and_avx512_builds_give_the_same_bits(monkeypatch):
    """Integer sums are exact and both builds apply the float steps in one order: quantized inputs, W4A8 and
    W4A16 products (float32 and bfloat16 outputs, bias, accumulation) agree bit for bit."""
    n, k, gs, m = 200, 264, 64, 11
    q, s, p, ws = _weights(n, k, gs, seed=3)
    bias = torch.randn(n)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(5)) * 4
    kp, groups = p.shape[1] * 8, ws.shape[0]
    outs = {}
    for isa in ("avx512_vnni", "avx2"):
        use_native_build(monkeypatch, isa)
        xq, xs, sx = native.quantize(x, kp, "dynamic_token", None, 127, gs, groups)
        y32, y16 = torch.ones(m, n), torch.ones(m, n, dtype=torch.bfloat16)
        gemm = native.W4A8Gemm([(p, ws, bias, n)], gs)
        gemm(xq, xs, sx, [y32], accumulate=True)
        gemm(xq, xs, sx, [y16], accumulate=True)
        yf = torch.empty(3, n)
        native.W4A16Gemm([(p, ws, None, n)], gs)(torch.nn.functional.pad(x[:3], (0, kp - k)), [yf])
        outs[isa] = (xq, xs, sx, y32, y16, yf)
    monkeypatch.undo()
    native._load.cache_clear()
    native.has_bf16.cache_clear()
    for a, b in zip(outs["avx512_vnni"], outs["avx2"]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("m,k,gs,mode", [
    (16, 576, 64, "dynamic_token"),     # one tile of tokens, SmolLM2's K and groups
    (100, 576, 128, "static_tensor"),   # tail rows (AVX-512) after 6 tiles; a ragged last group of 64
    (600, 128, 128, "dynamic_token"),   # past the AMX path's 512-row chunk: tiles on both sides of it
    (64, 192, 32, "dynamic_token"),     # 32-deep tile products
    (48, 200, 64, "dynamic_token"),     # a last group of 8: no tile depth fits, AVX-512 only
    (33, 256, -1, "static_tensor"),     # per channel: one group over all of K
    (600, 2304, 128, "dynamic_token"),  # a large K (2 x 16 channels of codes: 72 KB) past the 512-row chunk
    (300, 5120, 128, "dynamic_token"),  # K so long that a chunk is 256 rows (its codes stay in L2): both sides
    (40, 1600, 32, "static_tensor"),    # a large K of 32-deep tiles
    (20, 2304, -1, "dynamic_token"),    # per channel with a large K
])
def test_the_amx_and_avx512_builds_give_the_same_bits(monkeypatch, m, k, gs, mode):
    """The W4A8 product of 16 tokens or more runs on AMX int8 tiles in the avx512_amx build: exact int32 group
    sums and the AVX-512 kernel's float steps, so every output bit equals the avx512_vnni build's (several
    matrices in one call, bias, accumulation, float32 and bfloat16 outputs)."""
    ns = (200, 48, 16)
    kp = vnni_padded_shape(16, k)[1]
    gsz = kp if gs < 0 else gs
    mats = []
    for i, n in enumerate(ns):
        q, s, p, ws = _weights(n, k, gsz, seed=i)
        mats.append((p, ws, torch.randn(n) if i != 1 else None, n))
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 4
    groups = mats[0][1].shape[0]
    outs = {}
    for isa in ("avx512_amx", "avx512_vnni"):
        use_native_build(monkeypatch, isa)
        xq, xs, sx = native.quantize(x, kp, mode, torch.tensor(0.05), 127, gsz, groups)
        gemm = native.W4A8Gemm(mats, gsz)
        y32 = torch.ones(m, sum(ns))
        gemm(xq, xs, sx, [y32[:, :200], y32[:, 200:248], y32[:, 248:]], accumulate=True)
        y16 = [torch.empty(m, n, dtype=torch.bfloat16) for n in ns]
        gemm(xq, xs, sx, y16)
        outs[isa] = (y32, *y16)
    monkeypatch.undo()
    native._load.cache_clear()
    native.has_bf16.cache_clear()
    for a, b in zip(outs["avx512_amx"], outs["avx512_vnni"]):
        assert torch.equal(a, b)


def test_native_can_be_disabled(monkeypatch):
    from fptq.kernels import default_backend

    monkeypatch.setenv("FPTQ_NATIVE", "0")
    native._load.cache_clear()
    try:
        assert not native.available() and "FPTQ_NATIVE" in native.unavailable_reason()
        assert default_backend("cpu") == "int8_grouped"
    finally:
        monkeypatch.undo()
        native._load.cache_clear()


@pytest.mark.parametrize("b,h,hkv,hd,length,dtype", [(1, 9, 3, 64, 640, torch.float32), (4, 9, 3, 64, 37, torch.bfloat16),
                                                     (2, 14, 2, 64, 1, torch.bfloat16), (3, 4, 4, 128, 17, torch.float32),
                                                     (1, 9, 3, 64, 300, torch.bfloat16), (1, 8, 1, 128, 1031, torch.float32)])
def test_decode_attention_matches_sdpa(b, h, hkv, hd, length, dtype, build):
    g = torch.Generator().manual_seed(length)
    q = torch.randn(b, h, hd, generator=g)
    k, v = (torch.randn(b, hkv, length + 5, hd, generator=g).to(dtype) for _ in range(2))
    k[:, :, length:] = float("nan")  # positions past the length are never read
    out = native.decode_attention(q, k, v, length, 0.125)
    ref = torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k[:, :, :length].float(),
                                                           v[:, :, :length].float(), scale=0.125, enable_gqa=True)
    assert (out - ref[:, :, 0]).abs().max() < 1e-5


@pytest.mark.parametrize("b,hkv,length", [(1, 3, 300), (4, 3, 37)])
def test_decode_attention_reads_an_int8_cache(b, hkv, length, build):
    """int8 keys and values with a float32 scale per (sequence, head, position), at a length where the
    positions are split between threads (b=1) and one where they are not."""
    g = torch.Generator().manual_seed(b)
    q = torch.randn(b, 9, 64, generator=g)
    kq, vq = (torch.randint(-127, 128, (b, hkv, length + 3, 64), generator=g, dtype=torch.int8) for _ in range(2))
    ks, vs = (torch.rand(b, hkv, length + 3, generator=g) / 64 for _ in range(2))
    out = native.decode_attention(q, kq, vq, length, 0.125, kscale=ks, vscale=vs)
    k, v = (c[:, :, :length].float() * sc[:, :, :length, None] for c, sc in ((kq, ks), (vq, vs)))
    ref = torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k, v, scale=0.125, enable_gqa=True)
    assert (out - ref[:, :, 0]).abs().max() < 1e-5


@pytest.mark.parametrize("b,h,hkv,hd,start,t", [(1, 9, 3, 64, 0, 200), (2, 4, 2, 64, 10, 37), (1, 4, 4, 128, 0, 65),
                                                 (1, 2, 1, 64, 63, 1), (1, 6, 2, 96, 5, 50), (1, 2, 2, 64, 0, 16),
                                                 (1, 3, 1, 64, 1000, 40)])
@pytest.mark.parametrize("isa", ["avx512_amx", "avx512_vnni"])
def test_prefill_attention_matches_causal_sdpa(monkeypatch, isa, b, h, hkv, hd, start, t):
    """fptq's prompt attention on a bfloat16 cache: AMX-BF16 tiles in the ``avx512_amx`` build (head sizes that
    are multiples of 32), the AVX512-BF16 flash kernel in the ``avx512_vnni`` build (64 and 128); cache rows
    past the prompt hold NaN, which must not reach the output."""
    use_native_build(monkeypatch, isa)
    if not native.has_bf16():
        pytest.skip("needs AVX512-BF16")
    amx = native.has_amx_attention()
    assert amx == (isa == "avx512_amx")
    if not amx and hd not in (64, 128):
        pytest.skip("the flash kernel takes head sizes 64 and 128")
    g = torch.Generator().manual_seed(t)
    end = start + t
    q = torch.randn(b, h, t, hd, generator=g)
    k, v = (torch.randn(b, hkv, end + 3, hd, generator=g).to(torch.bfloat16) for _ in range(2))
    k[:, :, end:], v[:, :, end:] = float("nan"), float("nan")
    out = native.prefill_attention(q, k, v, start, 0.125)
    mask = (torch.arange(t)[:, None] + start) >= torch.arange(end)[None, :]
    ref = torch.nn.functional.scaled_dot_product_attention(q, k[:, :, :end].float(), v[:, :, :end].float(),
                                                           attn_mask=mask, scale=0.125, enable_gqa=True)
    # q and the probabilities are rounded to bfloat16 for the dot products: ~2^-8 relative
    assert (out - ref).abs().max() < 2 ** -6 * ref.abs().max()
    assert sqnr_db(ref, out) > 45  # measured 53-59 dB (AMX)
    # token-major output (the output projection's input rows): the same values, transposed
    assert torch.equal(native.prefill_attention(q, k, v, start, 0.125, tokens_major=True), out.transpose(1, 2))
    with pytest.raises(ValueError, match=r"contiguous float32 \[%d, %d, %d, %d\]" % (b, t, h, hd)):
        native.prefill_attention(q, k, v, start, 0.125, out=torch.empty(b, h, t, hd), tokens_major=True)


def test_amx_prefill_attention_keeps_large_score_ranges():
    """Scores 200 apart: query 5 (head 0) has a masked future key scoring 200 above its visible ones, queries 30
    and 40 (head 1) a visible key 200 and 95 above the rest. The softmax's maximum must be over the visible keys only (else
    query 5's probabilities all underflow alike), and 2^x must stay finite. The planted directions are kept
    out of every other query so that bfloat16 rounding does not swamp the check."""
    if not (native.available() and native.has_amx_attention()):
        pytest.skip("needs the avx512_amx build on a CPU with AMX-BF16")
    g = torch.Generator().manual_seed(1)
    t, hd = 48, 64
    q = torch.randn(1, 2, t, hd, generator=g)
    k = torch.randn(1, 1, t, hd, generator=g)
    q[..., :3], k[..., :3] = 0, 0
    q[0, 0, 5, 0], k[0, 0, 20, 0] = 40, 40  # q.k * 0.125 = 200
    q[0, 1, 30, 1], k[0, 0, 3, 1] = 40, 40
    q[0, 1, 40, 2], k[0, 0, 10, 2] = 27.6, 27.6  # 95: the other keys 2^-137 of it (below float's normal range)
    k, v = k.to(torch.bfloat16), torch.randn(1, 1, t, hd, generator=g).to(torch.bfloat16)
    out = native.prefill_attention(q, k, v, 0, 0.125)
    mask = torch.arange(t)[:, None] >= torch.arange(t)[None, :]
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.float(), v.float(), attn_mask=mask, scale=0.125,
                                                           enable_gqa=True)
    assert out.isfinite().all()
    err = (out - ref).abs().amax(-1) / ref.abs().amax(-1)  # per query row: one wrong row must not hide
    assert err.max() < 2 ** -6


def _integer_scaled(n, k, gs, seed):
    """A weight quantized with integer group scales (fptq.quant.intscales): codes, dequantized weight, and the
    kernels' (codes, scales) layout."""
    from fptq.quant.intscales import integer_group_scales
    from fptq.quant.weights import quantize_weight

    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.02
    w[:, 3] *= 10
    s = integer_group_scales(w, gs if gs > 0 else k)
    q = quantize_weight(w, s, 4, gs if gs > 0 else k)
    ws = torch.zeros(s.shape[1], vnni_padded_shape(n, k)[0], dtype=torch.float16)
    ws[:, :n] = s.t()
    return dequantize_weight(q, s, gs if gs > 0 else k), pack_int4_vnni(q), ws


@pytest.mark.parametrize("m,k,gs", [
    (100, 576, 64),    # 6 AMX tiles of tokens and 4 tail rows (AVX-512, per-group steps)
    (48, 256, 32),     # 32-deep tiles
    (600, 1152, 128),  # past the 512-row chunk
    (300, 5120, 128),  # past a 256-row chunk (a long K); each block's epilogue during the next block's products
    (40, 200, 64),     # a last group of 8: no tile depth fits, AVX-512 only
])
def test_integer_group_scales_sum_over_all_of_k_on_amx(monkeypatch, m, k, gs):
    """Group scales that are integer multiples of a channel base: the AMX build multiplies the codes by the
    integers (int8) and sums each product over the whole of K in int32, one float step per output; the
    avx512_vnni build keeps a float step per group. Both against the float64 product of the dequantized weights
    and the activation codes: the same values to float32 rounding (several matrices in one call, bias,
    accumulation, bfloat16 output)."""
    ns = (200, 48)
    deq, mats = [], []
    for i, n in enumerate(ns):
        d, p, ws = _integer_scaled(n, k, gs, seed=i)
        deq.append(d)
        mats.append((p, ws, torch.randn(n) if i == 0 else None, n))
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 3
    kp, groups = vnni_padded_shape(16, k)[1], mats[0][1].shape[0]
    outs = {}
    for isa in ("avx512_amx", "avx512_vnni"):
        use_native_build(monkeypatch, isa)
        xq, xs, sx = native.quantize(x, kp, "dynamic_token", None, 127, gs, groups)
        gemm = native.W4A8Gemm(mats, gs)
        assert all(f is not None for f in gemm.integer_scales)
        y32 = [torch.ones(m, n) for n in ns]
        gemm(xq, xs, sx, y32, accumulate=True)
        y16 = [torch.empty(m, n, dtype=torch.bfloat16) for n in ns]
        gemm(xq, xs, sx, y16)
        outs[isa] = (y32, y16)
    monkeypatch.undo()
    native._load.cache_clear()
    native.has_bf16.cache_clear()
    xd = xq[:, :k].double() * sx.double()[:, None]
    for (p, ws, bias, n), d, i in zip(mats, deq, range(2)):
        ref = xd @ d.double().t() + (bias.double() if bias is not None else 0)
        tol = 2e-6 * float(ref.abs().max())
        for isa in outs:
            y32, y16 = outs[isa][0][i], outs[isa][1][i]
            assert float((y32.double() - 1 - ref).abs().max()) < tol, isa
            assert float((y16.double() - ref).abs().max()) < 1e-2 * float(ref.abs().max()), isa


def test_one_group_per_channel_gives_the_same_bits_either_way(monkeypatch):
    """With one scale per output channel the integer path's single float step is the float path's only one:
    every bit equal between the builds."""
    d, p, ws = _integer_scaled(64, 256, -1, seed=3)
    x = torch.randn(40, 256, generator=torch.Generator().manual_seed(0))
    outs = []
    for isa in ("avx512_amx", "avx512_vnni"):
        use_native_build(monkeypatch, isa)
        xq, xs, sx = native.quantize(x, 256, "dynamic_token", None, 127, 256, 1)
        y = torch.empty(40, 64)
        native.W4A8Gemm([(p, ws, torch.randn(64, generator=torch.Generator().manual_seed(1)), 64)], 256)(xq, xs, sx, [y])
        outs.append(y)
    monkeypatch.undo()
    native._load.cache_clear()
    native.has_bf16.cache_clear()
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("up_integer", [True, False])
def test_fused_gate_up_with_integer_group_scales(up_integer, build):
    """The fused SiLU-and-multiply over integer-scaled gate and up gives the bits of the two products written out
    and native.silu_mul (the integer path when both are integer-scaled, the per-group one otherwise)."""
    m, k, n, gs = 70, 256, 80, 64
    _, p1, w1 = _integer_scaled(n, k, gs, seed=1)
    if up_integer:
        _, p2, w2 = _integer_scaled(n, k, gs, seed=2)
    else:
        _, _, p2, w2 = _weights(n, k, gs, seed=2)
    gemm = native.W4A8Gemm([(p1, w1, None, n), (p2, w2, None, n)], gs)
    if not gemm.has_glu:
        pytest.skip("no fused gate/up in this build")
    assert (gemm.integer_scales[1] is not None) == up_integer
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 3
    xq, xs, sx = native.quantize(x, k, "dynamic_token", None, 127, gs, k // gs)
    gu = torch.empty(m, 2 * n)
    gemm(xq, xs, sx, [gu[:, :n], gu[:, n:]])
    act = torch.empty(m, n)
    gemm.glu(xq, xs, sx, [torch.empty(m, n), torch.empty(m, n)], act)
    assert torch.equal(act, native.silu_mul(gu, n))
    # down_proj's static codes straight from the kernel (on AMX during the next row block's tile products)
    _glu_static_codes_match_silu_mul(gemm, xq, xs, sx, gu, [torch.empty(m, n), torch.empty(m, n)])
