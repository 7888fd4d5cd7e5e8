"""The runtime's output head: bfloat16 where the CPU multiplies it natively or for a few rows, float32 blocks
otherwise -- the same logits either way."""
import torch
import torch.nn.functional as F

from fptq.kernels import fast_bfloat16
from fptq.runtime.head import BF16_MAX_ROWS, BLOCK_ROWS, head_logits, native_16bit


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
