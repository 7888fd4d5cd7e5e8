"""The decode step's operations between the Linears (fptq.kernels.decode_ops): the PyTorch forms against
transformers' LLaMA modules (the same bits), the Triton forms (under Triton's interpreter on the CPU) against the
PyTorch forms (the same rounding steps; float32 sums in another order)."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from fptq.kernels import decode_ops as ops

INTERPRETED = importlib.util.find_spec("triton") is not None and os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="runs the Triton kernels under Triton's interpreter")
DTYPES = [torch.float32, torch.float16]


def _rand(*shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def _ulp(dtype):
    return 2e-6 if dtype == torch.float32 else 2e-3


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rmsnorm_is_transformers_residual_add_and_rmsnorm(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    h, d = _rand(3, 96, dtype=dtype, scale=4), _rand(3, 96, dtype=dtype, seed=1)
    norm = LlamaRMSNorm(96, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(_rand(96, dtype=dtype, seed=2).abs() + 0.5)
        ref_h = h + d
        ref = norm(ref_h)
        got_h = h.clone()
        got = ops.add_rmsnorm(got_h, d, norm.weight, norm.variance_epsilon)
    assert torch.equal(got_h, ref_h) and torch.equal(got, ref)
    assert torch.equal(ops.add_rmsnorm(h.clone(), None, norm.weight, 1e-5), norm(h))  # no residual add: h as is


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_write_kv_is_transformers_rotary_and_cache_write(dtype):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    b, hq, hkv, d, length, p = 2, 4, 2, 16, 12, 5
    q, k, v = _rand(b, hq * d, dtype=dtype), _rand(b, hkv * d, dtype=dtype, seed=1), _rand(b, hkv * d, dtype=dtype, seed=2)
    cos, sin = _rand(length, d, dtype=dtype, seed=3), _rand(length, d, dtype=dtype, seed=4)
    kc, vc = _rand(b, hkv, length, d, dtype=dtype, seed=5), _rand(b, hkv, length, d, dtype=dtype, seed=6)
    want_q, want_k = apply_rotary_pos_emb(q.view(b, hq, 1, d), k.view(b, hkv, 1, d), cos[p: p + 1][None],
                                          sin[p: p + 1][None])
    want_kc, want_vc = kc.clone(), vc.clone()
    want_kc[:, :, p], want_vc[:, :, p] = want_k[:, :, 0], v.view(b, hkv, d)
    got_q = ops.rope_write_kv(q, k, v, cos, sin, torch.tensor([p]), kc, vc)
    assert torch.equal(got_q, want_q[:, :, 0]) and torch.equal(kc, want_kc) and torch.equal(vc, want_vc)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_attention_reads_positions_up_to_pos_only(dtype):
    import torch.nn.functional as F

    b, hq, hkv, d, length, p = 2, 4, 2, 16, 20, 9
    q = _rand(b, hq, d, dtype=dtype)
    kc, vc = _rand(b, hkv, length, d, dtype=dtype, seed=1), _rand(b, hkv, length, d, dtype=dtype, seed=2)
    kc[:, :, p + 1:], vc[:, :, p + 1:] = 1e4, -1e4  # positions not yet written must not matter
    got = ops.decode_attention(q, kc, vc, torch.tensor([p]), 0.3)
    want = F.scaled_dot_product_attention(q.float()[:, :, None], kc[:, :, : p + 1].float(), vc[:, :, : p + 1].float(),
                                          scale=0.3, enable_gqa=True)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), want.reshape(b, hq * d), atol=_ulp(dtype), rtol=_ulp(dtype))


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [64, 96])
def test_triton_add_rmsnorm_matches_the_pytorch_form(dtype, k):
    h, d = _rand(3, k, dtype=dtype, scale=3), _rand(3, k, dtype=dtype, seed=1)
    w = _rand(k, dtype=dtype, seed=2).abs() + 0.5
    for delta in (d, None):
        a, b = h.clone(), h.clone()
        ref = ops.add_rmsnorm(a, delta, w, 1e-6)
        got = ops.add_rmsnorm(b, delta, w, 1e-6, use_triton=True)
        assert torch.equal(a, b)  # the residual add: one rounding of the same float32 sum
        assert got.dtype == ref.dtype
        torch.testing.assert_close(got, ref, atol=_ulp(dtype), rtol=_ulp(dtype))


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_rope_write_kv_gives_the_same_bits(dtype):
    b, hq, hkv, d, length = 3, 6, 2, 32, 10
    q, k, v = _rand(b, hq * d, dtype=dtype), _rand(b, hkv * d, dtype=dtype, seed=1), _rand(b, hkv * d, dtype=dtype, seed=2)
    cos, sin = _rand(length, d, dtype=dtype, seed=3), _rand(length, d, dtype=dtype, seed=4)
    for p in (0, 4, length - 1):
        kc, vc = _rand(b, hkv, length, d, dtype=dtype, seed=5), _rand(b, hkv, length, d, dtype=dtype, seed=6)
        kc2, vc2 = kc.clone(), vc.clone()
        pos = torch.tensor([p])
        ref = ops.rope_write_kv(q, k, v, cos, sin, pos, kc, vc)
        got = ops.rope_write_kv(q, k, v, cos, sin, pos, kc2, vc2, use_triton=True)
        assert torch.equal(got, ref) and torch.equal(kc2, kc) and torch.equal(vc2, vc)


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("splits", [1, 2, 3])
def test_triton_decode_attention_matches_the_pytorch_form(dtype, splits):
    from fptq.kernels.triton_decode import ATTN_BLOCK_N

    b, hq, hkv, d, length = 2, 4, 1, 16, 3 * ATTN_BLOCK_N + 5
    q = _rand(b, hq, d, dtype=dtype, scale=2)
    kc, vc = _rand(b, hkv, length, d, dtype=dtype, seed=1), _rand(b, hkv, length, d, dtype=dtype, seed=2)
    for p in (0, ATTN_BLOCK_N - 1, ATTN_BLOCK_N, length - 1):  # one position, a whole tile, a split's edge, all
        pos = torch.tensor([p])
        ref = ops.decode_attention(q, kc, vc, pos, 0.25)
        unread_k, unread_v = kc.clone(), vc.clone()
        unread_k[:, :, p + 1:], unread_v[:, :, p + 1:] = float("nan"), float("nan")  # the kernel never reads them
        got = ops.decode_attention(q, unread_k, unread_v, pos, 0.25, use_triton=True, splits=splits)
        torch.testing.assert_close(got, ref, atol=2 * _ulp(dtype), rtol=2 * _ulp(dtype))


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_silu_mul_matches_the_pytorch_form(dtype):
    g, u = _rand(3, 1500, dtype=dtype, scale=4), _rand(3, 1500, dtype=dtype, seed=1)
    torch.testing.assert_close(ops.silu_mul(g, u, use_triton=True), ops.silu_mul(g, u), atol=_ulp(dtype),
                               rtol=_ulp(dtype))


@needs_interpreter
def test_triton_forms_refuse_strided_inputs_with_a_clear_error():
    h = _rand(4, 64).t()
    with pytest.raises(ValueError, match="contiguous"):
        ops.add_rmsnorm(h, None, torch.ones(4), 1e-6, use_triton=True)
    with pytest.raises(ValueError, match="contiguous gate and up"):
        ops.silu_mul(h, h.contiguous(), use_triton=True)


def test_attention_splits_are_one_off_the_gpu():
    from fptq.kernels.triton_decode import attention_splits

    assert attention_splits(1, 32, 4096, torch.device("cpu")) == 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_with_per_head_norms_is_qwen3s_q_norm_k_norm_then_rotary(dtype):
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm, apply_rotary_pos_emb

    b, hq, hkv, d, length, p = 2, 4, 2, 16, 8, 3
    q, k, v = (_rand(b, hq * d, dtype=dtype, scale=3), _rand(b, hkv * d, dtype=dtype, seed=1, scale=3),
               _rand(b, hkv * d, dtype=dtype, seed=2))
    cos, sin = _rand(length, d, dtype=dtype, seed=3), _rand(length, d, dtype=dtype, seed=4)
    qn, kn = Qwen3RMSNorm(d, eps=1e-6).to(dtype), Qwen3RMSNorm(d, eps=1e-5).to(dtype)
    with torch.no_grad():
        qn.weight.copy_(_rand(d, dtype=dtype, seed=7).abs() + 0.5)
        kn.weight.copy_(_rand(d, dtype=dtype, seed=8).abs() + 0.5)
        want_q, want_k = apply_rotary_pos_emb(qn(q.view(b, hq, 1, d)), kn(k.view(b, hkv, 1, d)), cos[p: p + 1][None],
                                              sin[p: p + 1][None])
    norms = ((qn.weight.detach(), 1e-6), (kn.weight.detach(), 1e-5))
    kc, vc = torch.zeros(b, hkv, length, d, dtype=dtype), torch.zeros(b, hkv, length, d, dtype=dtype)
    got = ops.rope_write_kv(q, k, v, cos, sin, torch.tensor([p]), kc, vc, qk_norm=norms)
    assert torch.equal(got, want_q[:, :, 0]) and torch.equal(kc[:, :, p], want_k[:, :, 0])
    if INTERPRETED:
        kc2, vc2 = torch.zeros_like(kc), torch.zeros_like(vc)
        tri = ops.rope_write_kv(q, k, v, cos, sin, torch.tensor([p]), kc2, vc2, use_triton=True, qk_norm=norms)
        tol = 4 * _ulp(dtype)
        torch.testing.assert_close(tri, got, atol=tol, rtol=tol)
        torch.testing.assert_close(kc2, kc, atol=tol, rtol=tol)
        assert torch.equal(vc2, vc)


@pytest.mark.parametrize("static", [False, True], ids=["per-token", "static"])
def test_quantize_rows_is_quantlinears_quantizer(static):
    from fptq.nn import QuantLinear

    x = _rand(5, 96, scale=3)
    layer = QuantLinear(96, 8, wbits=4, group_size=32, abits=8, act_mode="static_tensor" if static else "dynamic_token")
    layer.act_scale = torch.tensor(0.04)
    q, s = ops.quantize_rows(x, (layer.act_scale if static else None, layer.abits))
    q_ref, s_ref = layer.quantize_input(x)
    assert torch.equal(q, q_ref) and torch.equal(s.reshape(-1), s_ref.reshape(-1))


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("static", [False, True], ids=["per-token", "static"])
def test_triton_norm_and_silu_quantize_their_output_as_quantize_activations_does(dtype, static):
    """The codes made in the launch that makes a Linear's input are quantize_activations' codes of that input, bit
    for bit, so a W4A8 Linear given them computes what it would from the float input."""
    from fptq.kernels.triton_quant import quantize_activations

    scale = torch.tensor(0.02) if static else None
    h, d = _rand(3, 96, dtype=dtype, scale=3), _rand(3, 96, dtype=dtype, seed=1)
    w = _rand(96, dtype=dtype, seed=2).abs() + 0.5
    out, q, s = ops.add_rmsnorm(h.clone(), d, w, 1e-6, use_triton=True, quant=(scale, 8))
    assert torch.equal(out, ops.add_rmsnorm(h.clone(), d, w, 1e-6, use_triton=True))
    q_ref, s_ref = quantize_activations(out, scale)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    g, u = _rand(2, 1500, dtype=dtype, scale=4), _rand(2, 1500, dtype=dtype, seed=1)
    out, q, s = ops.silu_mul(g, u, use_triton=True, quant=(scale, 8))
    assert torch.equal(out, ops.silu_mul(g, u, use_triton=True))
    q_ref, s_ref = quantize_activations(out, scale)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)


@needs_interpreter
@pytest.mark.parametrize("splits", [1, 2])
def test_triton_attention_quantizes_its_output_with_a_static_scale(splits):
    """The output projection's input codes made by the attention launch itself (each head's slice with the static
    scale): quantize_activations' codes of the same output, bit for bit; per-token scales are refused (they need
    every head's output)."""
    from fptq.kernels.triton_quant import quantize_activations

    b, hq, hkv, d, length = 2, 4, 2, 16, 70
    q = _rand(b, hq, d, dtype=torch.float16, scale=2)
    kc, vc = _rand(b, hkv, length, d, dtype=torch.float16, seed=1), _rand(b, hkv, length, d, dtype=torch.float16, seed=2)
    pos, scale = torch.tensor([length - 3]), torch.tensor(0.01)
    out, codes, s = ops.decode_attention(q, kc, vc, pos, 0.25, use_triton=True, splits=splits, quant=(scale, 8))
    assert torch.equal(out, ops.decode_attention(q, kc, vc, pos, 0.25, use_triton=True, splits=splits))
    q_ref, _ = quantize_activations(out, scale)
    assert torch.equal(codes, q_ref) and float(s) == float(scale)
    with pytest.raises(ValueError, match="static scale only"):
        ops.decode_attention(q, kc, vc, pos, 0.25, use_triton=True, quant=(None, 8))


@needs_interpreter
@pytest.mark.parametrize("quant", [False, True])
def test_triton_attention_combines_its_splits_in_the_same_launch_with_counters(quant):
    """With counters (one per query head) the last split of each head to finish combines the splits: the
    two-launch output (and static codes) bit for bit, at every position, the counters back at zero each time (a
    CUDA graph replays the same buffer); the device check that gates it passes off CUDA."""
    from fptq.kernels.triton_decode import ATTN_BLOCK_N, serial_attention_verified

    assert serial_attention_verified(torch.device("cpu"))
    b, hq, hkv, d, length = 2, 4, 2, 16, 4 * ATTN_BLOCK_N
    q = _rand(b, hq, d, dtype=torch.float16, scale=2)
    kc, vc = _rand(b, hkv, length, d, dtype=torch.float16, seed=1), _rand(b, hkv, length, d, dtype=torch.float16, seed=2)
    counters = torch.zeros(b * hq + 3, dtype=torch.int32)  # more than needed is fine
    spec = (torch.tensor(0.01), 8) if quant else None
    for p in (0, ATTN_BLOCK_N + 3, length - 1):  # splits with no position too
        pos = torch.tensor([p])
        two = ops.decode_attention(q, kc, vc, pos, 0.25, use_triton=True, splits=4, quant=spec)
        one = ops.decode_attention(q, kc, vc, pos, 0.25, use_triton=True, splits=4, quant=spec, counters=counters)
        for a, c in zip((one,) if not quant else one, (two,) if not quant else two):
            assert torch.equal(a, c)
        assert not counters.any()
    with pytest.raises(ValueError, match="counters must be int32"):
        ops.decode_attention(q, kc, vc, pos, 0.25, use_triton=True, splits=4, counters=counters[:3])
