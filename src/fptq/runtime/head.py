"""The output head (``lm_head``) of the runtime: logits from the final hidden states.

A checkpoint keeps its head in 16 bits (bf16 by default). Where the CPU multiplies bf16 natively (AVX-512 BF16,
AMX) PyTorch's bf16 ``linear`` is the way, except for a prompt's logits at every position on AMX: from
:data:`AMX_MIN_ROWS` rows, with a hidden size up to :data:`AMX_MAX_K`, fptq's AMX-BF16 kernel
(:func:`fptq.kernels.native.head_bf16`, the same product: float32 sums rounded to bf16) is faster -- it keeps a
block of the weight in L1 while the rows stream past, prefetches the next block, and maps the new logits' pages
before the products rather than between them. Where the CPU has no native bf16 (AVX2 CPUs), PyTorch emulates bf16
products: a bf16 head is the fastest for one or a few rows (it reads half the bytes of a float32 copy) but several
times slower than float32 for more (measured on SmolLM2's 49152 x 576 head, 2 threads of an AVX2 EPYC: 46 ms at 16 rows
against 18 ms for a float32 copy of the weight). There the rows beyond :data:`BF16_MAX_ROWS` are multiplied in
float32 by blocks of :data:`BLOCK_ROWS` vocabulary rows, each block of the weight widened to float32 on the fly:
15 ms at 16 rows, with no float32 copy of the head kept (it would double the head's memory).

:class:`Int8Head` (the runtime's default for quantized models): the head requantized at load to
int8 weights in groups of 64 inputs (float16 scales), held as two 4-bit planes that fptq's W4A8 kernels multiply
(:mod:`fptq.quant.planes`), with each input row split into two int8 terms (about 15 bits). It reads half the
bytes of a bf16 head, where decoding is memory-bound: SmolLM2's head at one row 3.1 -> 1.7 ms on the AVX2 EPYC.
By default (``head="auto"``) it serves up to :data:`INT8_MAX_ROWS` rows (decoding); more rows (a prompt's logits
at every position) are compute-bound and go to the stored head (``head="int8"``: the int8 head for every call).
Its logits differ from the stored head's by the int8 rounding of the weights: WikiText-2 perplexity +0.17 %
(SmolLM2) and +0.09 % (Qwen2.5-Coder-0.5B) with every position's logits from the int8 head (docs/results/speed.md). ``head="stored"``: the checkpoint's head for every call.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FptqError
from ..kernels import fast_bfloat16, native
from ..quant.pack import pack_int4_vnni, vnni_padded_shape
from ..quant.planes import int8_group_quantize, split_planes

__all__ = ["AMX_MAX_K", "AMX_MIN_ROWS", "BF16_MAX_ROWS", "BLOCK_ROWS", "BUILD_ROWS", "CHUNK_ROWS", "HEADS",
           "HEAD_GROUP", "INT8_MAX_ROWS", "Int8Head", "StoredHead", "amx_head_logits", "check_head", "head_logits",
           "int8_head_problem", "native_16bit", "runtime_head"]

HEADS = ("auto", "int8", "stored")  # the runtime's ``head`` choices (see runtime_head)
HEAD_GROUP = 64  # inputs per int8 scale of :class:`Int8Head`
CHUNK_ROWS = 64  # rows of hidden states an Int8Head multiplies at a time (bounds its temporaries)
# Up to this many rows the int8 head is faster than the stored one (SmolLM2's 49152 x 576 head, 2 threads of the
# AVX2 EPYC: 1.7 / 3.7 / 13.9 / 53 ms at 1 / 4 / 16 / 64 rows against 3.1 / 11.8 / 30.1 / 56 ms for bf16;
# 249 against 158 ms at 256 rows); beyond, an Int8Head built by runtime_head hands the rows to the stored head.
INT8_MAX_ROWS = 64
BUILD_ROWS = 4096  # vocabulary rows an Int8Head quantizes and packs at a time (a multiple of 16)

# up to this many rows a 16-bit head is multiplied in its own dtype, even where that is emulated
BF16_MAX_ROWS = 4
# vocabulary rows widened to float32 at a time (a 1024 x 896 block is 3.5 MiB)
BLOCK_ROWS = 1024
# From this many rows, and up to this hidden size, a bfloat16 head runs on fptq's AMX kernel where it can
# (amx_head_logits). Fewer rows: PyTorch's product is about as fast (bench/results/head_amx.md: 0.9-1.2x at 16-64
# rows). A larger hidden size: the kernel runs the rows in passes of 1 MiB of them (512 rows at 1024), each reading
# the whole weight again, and loses (LLaMA-2-7B's 32000 x 4096 head: 0.6-0.7x at 512-2048 rows).
AMX_MIN_ROWS = 128
AMX_MAX_K = 1024


def native_16bit(weight: torch.Tensor) -> bool:
    """Whether ``weight``'s device multiplies its dtype natively: float32 anywhere, bfloat16 where
    :func:`fptq.kernels.fast_bfloat16`, float16 on GPUs (on CPUs without AVX512-FP16 it is emulated too)."""
    if weight.dtype == torch.float32 or weight.device.type != "cpu":
        return True
    return weight.dtype == torch.bfloat16 and fast_bfloat16(weight.device)


def amx_head_logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """``x @ weight.T`` ``[M, V]`` in bfloat16 by fptq's AMX-BF16 head kernel (:func:`fptq.kernels.native.head_bf16`)
    where it applies: a bfloat16 weight on a CPU where :func:`~fptq.kernels.native.has_amx_head`, no bias, at least
    :data:`AMX_MIN_ROWS` rows and an input size that is a multiple of 32 up to :data:`AMX_MAX_K`; else ``None``."""
    if not (x.shape[0] >= AMX_MIN_ROWS and bias is None and weight.dtype == torch.bfloat16
            and weight.device.type == "cpu" and weight.shape[1] % 32 == 0 and weight.shape[1] <= AMX_MAX_K
            and weight.is_contiguous() and native.available() and native.has_amx_head()):
        return None
    return native.head_bf16(x.to(torch.bfloat16).contiguous(), weight)


def head_logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, native: bool) -> torch.Tensor:
    """``x @ weight.T + bias`` for hidden states ``x`` ``[M, K]`` (any float dtype). ``native``:
    :func:`native_16bit` of ``weight`` (computed once by the caller). Returns ``weight``'s dtype either way: the
    blocked path rounds its float32 sums as a 16-bit product does, so logits do not change type or precision
    with the number of rows. Where :func:`amx_head_logits` applies, fptq's AMX kernel: the same bfloat16 product,
    faster than PyTorch's on the heads of small models (bench/results/head_amx.md)."""
    out = amx_head_logits(x, weight, bias)
    if out is not None:
        return out
    if native or x.shape[0] <= BF16_MAX_ROWS:
        return F.linear(x.to(weight.dtype), weight, bias)
    xf = x.to(weight.dtype).float()  # the same rounded inputs as the 16-bit product
    out = torch.empty(x.shape[0], weight.shape[0], dtype=torch.float32)
    for a in range(0, weight.shape[0], BLOCK_ROWS):
        torch.matmul(xf, weight[a: a + BLOCK_ROWS].float().t(), out=out[:, a: a + BLOCK_ROWS])
    if bias is not None:
        out += bias.float()
    return out.to(weight.dtype)


class StoredHead:
    """The checkpoint's head as stored (``head="stored"``): :func:`head_logits` of its weight."""

    kind = "stored"

    def __init__(self, linear: nn.Linear):
        self.weight, self.bias = linear.weight, linear.bias

    @property
    def label(self) -> str:
        return str(self.weight.dtype).replace("torch.", "")

    def __call__(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Logits of ``x`` ``[M, K]`` in ``dtype`` (default: the weight's, as ``nn.Linear`` gives)."""
        out = head_logits(x, self.weight, self.bias, native_16bit(self.weight))  # the dtype may change later
        return out if dtype is None else out.to(dtype)


class Int8Head:
    """``x @ W8.T + bias`` with ``W8`` the int8 requantization of the head's weight (see the module docstring):
    float32 logits ``[..., N]`` for hidden states ``x`` ``[..., K]`` of any float dtype, for up to
    :data:`INT8_MAX_ROWS` rows (decoding, where the product is memory-bound). More rows (a prompt's logits at
    every position, perplexity) are compute-bound, where four int8 row products per row cost more than one float
    product: those go to ``large`` (the stored head, :class:`StoredHead`), if given. Holds its own packed planes
    (half the bytes of a 16-bit head)."""

    kind = label = "int8"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group_size: int = HEAD_GROUP,
                 large: "StoredHead | None" = None):
        w = weight.detach()
        self.n, self.k = w.shape
        planes: tuple[list, list] = ([], [])
        scales = []
        for a in range(0, self.n, BUILD_ROWS):  # blocks that stay in cache: 3x faster than whole-matrix passes
            codes, s = int8_group_quantize(w[a: a + BUILD_ROWS], group_size)
            for packed, plane in zip(planes, split_planes(codes)):
                packed.append(pack_int4_vnni(plane))
            scales.append(s)
        s = torch.cat(scales)
        self.group_size, self.groups = group_size, s.shape[1]
        np_, self.kp = vnni_padded_shape(self.n, self.k)
        gemms = []
        for packed, mult in zip(planes, (16.0, 1.0)):
            ws = torch.zeros(self.groups, np_, dtype=torch.float16)
            ws[:, : self.n] = (s.float() * mult).to(torch.float16).t()
            if not bool(torch.isfinite(ws).all()):
                raise FptqError("the output head's weights are too large for float16 scales; use head='stored'")
            gemms.append(native.W4A8Gemm([(torch.cat(packed), ws, None, self.n)], group_size))
        self._hi, self._lo = gemms
        self.bias = None if bias is None else bias.detach().float()
        self.large = large
        self._work: dict[int, torch.Tensor] = {}  # rows -> the [2 rows, N] products of both terms, reused

    def nbytes(self) -> int:
        """Bytes of the packed planes and scales (what one product reads)."""
        return sum(t.numel() * t.element_size() for g in (self._hi, self._lo) for w in g._keep for t in w[:2])

    def _terms(self, x: torch.Tensor) -> tuple:
        """int8 codes ``[2m, Kp]``, group sums and scales ``[2m]`` of the rows of float32 ``x`` ``[m, K]``: the
        rows, then their residuals (:func:`fptq.quant.planes.two_term_per_token`, the same bits)."""
        args = (self.kp, "dynamic_token", None, 127, self.group_size, self.groups)
        q1, xs1, s1 = native.quantize(x, *args)
        q2, xs2, s2 = native.quantize(x - q1[:, : self.k].float() * s1[:, None], *args)
        return torch.cat([q1, q2]), torch.cat([xs1, xs2]), torch.cat([s1, s2])

    def int8_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The int8 product of float32 rows ``x`` ``[m, K]`` (any m), :data:`CHUNK_ROWS` at a time."""
        m = x.shape[0]
        out = torch.empty(m, self.n, dtype=torch.float32)
        for a in range(0, m, CHUNK_ROWS):
            xc = x[a: a + CHUNK_ROWS]
            mc = xc.shape[0]
            xq, xs, sx = self._terms(xc)
            y = self._work.get(mc)
            if y is None:
                y = self._work[mc] = torch.empty(2 * mc, self.n, dtype=torch.float32)
            self._hi(xq, xs, sx, [y])
            self._lo(xq, xs, sx, [y], accumulate=True)
            torch.add(y[:mc], y[mc:], out=out[a: a + mc])
        if self.bias is not None:
            out += self.bias
        return out

    def __call__(self, x: torch.Tensor, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """Logits of ``x`` ``[..., K]`` in ``dtype`` (float32 by default, what :class:`~fptq.runtime.Engine`
        returns). ``None``: each product's own, float32 from the int8 product, the stored head's dtype from
        ``large``, with no conversion (the transformers interface: a prompt's float32 logits would be a copy of
        the bfloat16 ones at twice the bytes, 100 MB and ~25 ms for SmolLM2's 512 positions on the AMX Xeon;
        decoding keeps the int8 product's float32 sums)."""
        if x.shape[-1] != self.k:
            raise ValueError(f"Int8Head: expected hidden states [..., {self.k}], got {tuple(x.shape)}")
        lead = x.shape[:-1]
        x = x.reshape(-1, self.k)
        if x.shape[0] > INT8_MAX_ROWS and self.large is not None:
            return self.large(x, dtype).view(*lead, self.n)
        out = self.int8_logits(x.float().contiguous())
        return (out if dtype is None else out.to(dtype)).view(*lead, self.n)


def int8_head_problem(linear: nn.Module) -> str | None:
    """Why ``linear`` cannot become an :class:`Int8Head` (``None`` if it can)."""
    if not isinstance(linear, nn.Linear):
        return f"the head is a {type(linear).__name__}, not a Linear"
    if not native.available():
        return f"fptq's native kernels are unavailable ({native.unavailable_reason()})"
    if linear.weight.device.type != "cpu":
        return f"the head is on {linear.weight.device} (the int8 head runs on the CPU)"
    if not linear.weight.dtype.is_floating_point:
        return f"the head's weight is {linear.weight.dtype}"
    return None


def check_head(choice: str) -> str:
    """``choice`` if it is one of :data:`HEADS`, else :class:`~fptq.errors.FptqError` listing them."""
    if choice not in HEADS:
        raise FptqError(f"head must be one of {', '.join(HEADS)}, not {choice!r}")
    return choice


def runtime_head(linear: nn.Linear, choice: str = "auto", quantized: bool = True) -> StoredHead | Int8Head:
    """The head the runtime multiplies with, for ``choice`` of :data:`HEADS`:

    * ``"auto"``: for a quantized model (``quantized``) where :func:`int8_head_problem` allows it, the int8 head
      up to :data:`INT8_MAX_ROWS` rows and the stored head beyond (the faster of the two at each size); else
      the stored head;
    * ``"int8"``: the int8 head for every call (one numerics whatever the number of rows); where it cannot be,
      :class:`~fptq.errors.FptqError` naming why;
    * ``"stored"``: the checkpoint's head as stored."""
    check_head(choice)
    if choice == "stored" or (choice == "auto" and not quantized):
        return StoredHead(linear)
    why = int8_head_problem(linear)
    if why is not None:
        if choice == "int8":
            raise FptqError(f"cannot use an int8 output head: {why}; use head='stored'")
        return StoredHead(linear)
    return Int8Head(linear.weight, linear.bias, large=StoredHead(linear) if choice == "auto" else None)
