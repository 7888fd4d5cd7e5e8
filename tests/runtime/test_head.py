"""The runtime's output head: the stored one (bfloat16 where the CPU multiplies it natively or for a few rows,
float32 blocks otherwise -- the same logits either way) and the int8 head (two 4-bit planes, two-term
activations) against the integers it multiplies."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from fptq.errors import FptqError
from fptq.kernels import fast_bfloat16, native
from fptq.quant.planes import int8_group_quantize, two_term_per_token
from fptq.runtime.head import (AMX_MAX_K, AMX_MIN_ROWS, BF16_MAX_ROWS, BLOCK_ROWS, BUILD_ROWS, CHUNK_ROWS,
                               HEAD_GROUP, HEADS, INT8_MAX_ROWS, Int8Head, amx_head_logits, head_logits,
                               native_16bit, runtime_head)

from ..conftest import use_native_build


def _head(vocab=2 * BLOCK_ROWS + 77, k=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(vocab, k, generator=g).bfloat16(), torch.randn(vocab, generator=g).bfloat16()


def test_blocked_float32_head_equals_the_float32_product_over_a_ragged_last_block():
    w, b = _head()
    x = torch.randn(BF16_MAX_ROWS + 3, w.shape[1])
    out = head_logits(x, w, b, native=False)
    ref = F.linear(x.bfloat16(), w, b)  # float32 sums rounded to bfloat16
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    # the same rounded sums up to the float32 summation order: at most one bfloat16 step apart
    assert ((out.float() - ref.float()).abs() <= 2 ** -7 * ref.float().abs() + 1e-6).all()
    assert (out != ref).float().mean() < 0.01
    nob, ref_nob = head_logits(x, w, None, native=False).float(), F.linear(x.bfloat16(), w).float()
    assert ((nob - ref_nob).abs() <= 2 ** -7 * ref_nob.abs() + 1e-6).all()


def test_few_rows_or_a_native_dtype_keep_the_weights_dtype():
    w, b = _head()
    few = torch.randn(BF16_MAX_ROWS, w.shape[1])
    assert torch.equal(head_logits(few, w, b, native=False), F.linear(few.bfloat16(), w, b))
    many = torch.randn(BF16_MAX_ROWS + 1, w.shape[1])
    assert torch.equal(head_logits(many, w, b, native=True), F.linear(many.bfloat16(), w, b))


def test_native_16bit_follows_the_cpu():
    w, _ = _head(vocab=8)
    assert native_16bit(w.float())
    assert native_16bit(w) == fast_bfloat16("cpu")
    assert not native_16bit(w.half())  # float16 products are emulated on CPUs without AVX512-FP16


# ------------------------------------------------------------------ the int8 head
needs_native = pytest.mark.skipif(not native.available(), reason="the int8 head runs fptq's native kernels")


def _exact_int8_logits(x, w, b, group_size=HEAD_GROUP):
    """float64 product of the two-term activations and the int8 weights: the integers the kernels multiply."""
    q, s = int8_group_quantize(w, group_size)
    wd = q.double() * s.double().repeat_interleave(group_size, 1)[:, : w.shape[1]]
    xq, xs = two_term_per_token(x)
    y = (xq.double() * xs.double()).sum(0) @ wd.T
    return y if b is None else y + b.double()


@needs_native
@pytest.mark.parametrize("k,rows,vocab", [(96, 1, 300), (200, 3, 300), (100, CHUNK_ROWS + 6, 300),
                                          (64, 2, 2 * BUILD_ROWS + 77)])
def test_int8_head_computes_the_integer_product_of_its_two_planes(k, rows, vocab):
    """Any K (ragged groups, K not a multiple of 8), chunked rows, bias, a vocabulary built in several blocks
    with a ragged last one: float32 logits equal to the float64 product of the same integers up to float32
    summation."""
    w, b = _head(vocab=vocab, k=k)
    x = torch.randn(rows, k)
    x[:, 5] *= 30
    head = Int8Head(w, b.float())
    out = head(x)
    ref = _exact_int8_logits(x, w, b.float())
    assert out.dtype == torch.float32 and out.shape == (rows, vocab)
    assert ((out.double() - ref).abs() <= 1e-5 * ref.abs().max()).all()
    xq, xs, sx = head._terms(x)  # the native two-term split: the reference's bits
    rq, rs = two_term_per_token(x)
    assert torch.equal(xq[:, :k], rq.reshape(2 * rows, k)) and torch.equal(sx, rs.reshape(-1))
    assert torch.equal(head(x.view(1, rows, k))[0], out)  # leading dims are kept
    with pytest.raises(ValueError, match="expected hidden states"):
        head(torch.randn(2, k + 1))


@needs_native
def test_int8_head_reads_half_the_bytes_of_bf16_and_stays_close_to_it():
    w, _ = _head(vocab=1000, k=256)
    head = Int8Head(w, None)
    assert head.nbytes() < 0.55 * w.numel() * 2
    x = torch.randn(4, 256)
    from ..conftest import sqnr_db
    assert sqnr_db(F.linear(x, w.float()), head(x)) > 38  # int8 weights in groups of 64, ~15-bit activations


@needs_native
def test_the_runtime_int8_head_hands_many_rows_to_the_stored_head():
    """head="auto": rows beyond INT8_MAX_ROWS are compute-bound: the stored head's logits (as float32), exactly;
    head="int8" keeps the int8 product for any number of rows."""
    w, b = _head(vocab=300, k=64)
    lin = torch.nn.Linear(64, 300, dtype=torch.bfloat16)
    lin.weight.data, lin.bias.data = w, b
    head, int8 = runtime_head(lin, "auto", True), runtime_head(lin, "int8", True)
    stored = runtime_head(lin, "stored", True)
    with torch.no_grad():
        many = torch.randn(INT8_MAX_ROWS + 1, 64)
        assert torch.equal(head(many), stored(many).float())
        own = head(many, None)  # the transformers interface: the stored head's own dtype, not a float32 copy
        assert own.dtype == torch.bfloat16 and torch.equal(own, stored(many))
        assert head(many[:2], None).dtype == torch.float32  # the int8 product's own
        assert torch.equal(int8(many), head.int8_logits(many))
        few = many[:INT8_MAX_ROWS]
        assert torch.equal(head(few), head.int8_logits(few)) and not torch.equal(head(few), stored(few).float())


def test_runtime_head_choices():
    lin = torch.nn.Linear(64, 100)
    assert runtime_head(lin, "stored", True).kind == "stored"
    assert runtime_head(lin, "auto", False).kind == "stored"  # a float model keeps its head
    want = "int8" if native.available() else "stored"
    assert runtime_head(lin, "auto", True).kind == want
    with pytest.raises(FptqError, match="head must be one of"):
        runtime_head(lin, "int4", True)
    assert set(HEADS) == {"auto", "int8", "stored"}


def test_without_native_kernels_auto_keeps_the_stored_head_and_int8_says_why():
    code = ("import torch; from fptq.runtime.head import runtime_head; from fptq.errors import FptqError\n"
            "lin = torch.nn.Linear(64, 100)\n"
            "assert runtime_head(lin, 'auto', True).kind == 'stored'\n"
            "try:\n    runtime_head(lin, 'int8', True)\nexcept FptqError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "FPTQ_NATIVE": "0"}, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "cannot use an int8 output head" in r.stdout and "native kernels are unavailable" in r.stdout


# ------------------------------------------------------------------ the AMX-BF16 head kernel
needs_amx_head = pytest.mark.skipif(not (native.available() and native.has_amx_head()),
                                    reason="needs fptq's avx512_amx build on a CPU with AMX-BF16")


@needs_amx_head
@pytest.mark.parametrize("m, vocab, k", [
    (1, 33, 32),       # one row, a ragged block of vocabulary rows
    (31, 64, 96),      # fewer rows than two tiles
    (600, 100, 1024),  # two passes over the weight (512 rows of K = 1024 fill its 1 MiB), the second one ragged
    (77, 4128, 576),   # SmolLM2's hidden size, many vocabulary blocks for each thread
])
def test_the_amx_head_kernel_is_the_bfloat16_product(m, vocab, k):
    """float32 sums of exact bfloat16 products rounded once to bfloat16: within the rounding of the float64
    product, and PyTorch's bfloat16 F.linear up to the order of its float32 sums."""
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=g).bfloat16()
    w = (torch.randn(vocab, k, generator=g) * 0.05).bfloat16()
    out = native.head_bf16(x, w)
    assert out.dtype == torch.bfloat16 and out.shape == (m, vocab)
    ref = x.double() @ w.double().t()
    float32_sums = k * 2 ** -24 * (x.double().abs() @ w.double().abs().t())
    assert ((out.double() - ref).abs() <= 2 ** -8 * (ref.abs() + float32_sums) + float32_sums).all()
    lin = F.linear(x, w)
    assert ((out.float() - lin.float()).abs() <= 2 ** -7 * lin.float().abs() + 1e-6).all()
    assert (out != lin).float().mean() < 0.01


@needs_amx_head
def test_the_stored_head_multiplies_many_rows_without_a_bias_on_the_amx_kernel():
    w, b = _head(vocab=1000, k=64)
    x = torch.randn(AMX_MIN_ROWS, 64)
    assert torch.equal(head_logits(x, w, None, native=True), native.head_bf16(x.bfloat16(), w))
    # a bias, fewer rows, an input size that is not a multiple of 32 or above AMX_MAX_K, a float32 weight:
    # PyTorch's product
    assert amx_head_logits(x, w, b) is None
    assert torch.equal(head_logits(x, w, b, native=True), F.linear(x.bfloat16(), w, b))
    few = x[:AMX_MIN_ROWS - 1]
    assert amx_head_logits(few, w, None) is None
    assert torch.equal(head_logits(few, w, None, native=True), F.linear(few.bfloat16(), w))
    assert amx_head_logits(x[:, :48], w[:, :48].contiguous(), None) is None
    assert amx_head_logits(x, w.float(), None) is None
    big = AMX_MAX_K + 32
    assert amx_head_logits(torch.randn(AMX_MIN_ROWS, big), torch.randn(50, big).bfloat16(), None) is None


@needs_native
def test_the_head_kernel_refuses_what_it_cannot_multiply():
    w = torch.randn(100, 64).bfloat16()
    with pytest.raises(ValueError, match="must be bfloat16"):
        native.head_bf16(torch.randn(20, 64), w)
    with pytest.raises(ValueError, match=r"one K \(got \[20, 32\] and \[100, 64\]\)"):
        native.head_bf16(torch.randn(20, 32).bfloat16(), w)
    assert native.head_bf16(torch.randn(20, 48).bfloat16(), w[:, :48].contiguous()) is None  # K not a multiple of 32


def test_the_head_kernel_is_only_in_the_amx_build(monkeypatch):
    """The avx512_vnni build (and the AVX2 one) has no AMX head: head_bf16 says so with None, and head_logits
    multiplies with PyTorch."""
    try:
        use_native_build(monkeypatch, "avx512_vnni")
        w = torch.randn(100, 64).bfloat16()
        x = torch.randn(AMX_MIN_ROWS, 64)
        assert not native.has_amx_head() and native.head_bf16(x.bfloat16(), w) is None
        assert torch.equal(head_logits(x, w, None, native=True), F.linear(x.bfloat16(), w))
    finally:
        monkeypatch.undo()
        native._load.cache_clear()
        native.has_bf16.cache_clear()
