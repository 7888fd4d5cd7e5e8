"""The output head (``lm_head``) of the runtime: logits from the final hidden states.

A checkpoint keeps its head in 16 bits (bf16 by default). Where the CPU multiplies bf16 natively (AVX-512 BF16,
AMX) PyTorch's bf16 ``linear`` is the fastest way. Where it does not (AVX2 CPUs), PyTorch emulates bf16 products:
a bf16 head is the fastest for one or a few rows (it reads half the bytes of a float32 copy) but several times
slower than float32 for more (measured on SmolLM2's 49152 x 576 head, 2 threads of an AVX2 EPYC: 46 ms at 16 rows
against 18 ms for a float32 copy of the weight). There the rows beyond :data:`BF16_MAX_ROWS` are multiplied in
float32 by blocks of :data:`BLOCK_ROWS` vocabulary rows, each block of the weight widened to float32 on the fly:
15 ms at 16 rows, with no float32 copy of the head kept (it would double the head's memory).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels import fast_bfloat16

__all__ = ["BF16_MAX_ROWS", "BLOCK_ROWS", "head_logits", "native_16bit"]

# up to this many rows a 16-bit head is multiplied in its own dtype, even where that is emulated
BF16_MAX_ROWS = 4
# vocabulary rows widened to float32 at a time (a 1024 x 896 block is 3.5 MiB)
BLOCK_ROWS = 1024


def native_16bit(weight: torch.Tensor) -> bool:
    """Whether ``weight``'s device multiplies its dtype natively: float32 anywhere, bfloat16 where
    :func:`fptq.kernels.fast_bfloat16`, float16 on GPUs (on CPUs without AVX512-FP16 it is emulated too)."""
    if weight.dtype == torch.float32 or weight.device.type != "cpu":
        return True
    return weight.dtype == torch.bfloat16 and fast_bfloat16(weight.device)


def head_logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, native: bool) -> torch.Tensor:
    """``x @ weight.T + bias`` for hidden states ``x`` ``[M, K]`` (any float dtype). ``native``:
    :func:`native_16bit` of ``weight`` (computed once by the caller). Returns ``weight``'s dtype either way: the
    blocked path rounds its float32 sums as a 16-bit product does, so logits do not change type or precision
    with the number of rows."""
    if native or x.shape[0] <= BF16_MAX_ROWS:
        return F.linear(x.to(weight.dtype), weight, bias)
    xf = x.to(weight.dtype).float()  # the same rounded inputs as the 16-bit product
    out = torch.empty(x.shape[0], weight.shape[0], dtype=torch.float32)
    for a in range(0, weight.shape[0], BLOCK_ROWS):
        torch.matmul(xf, weight[a: a + BLOCK_ROWS].float().t(), out=out[:, a: a + BLOCK_ROWS])
    if bias is not None:
        out += bias.float()
    return out.to(weight.dtype)
