"""The native GEMM calls: products of one quantized (or float) input with one or more 4-bit weight matrices."""
from __future__ import annotations

import ctypes

import torch

from ...quant.intscales import INT_SUM_MAX_K, integer_scale_factors
from .build import _c_i64, _c_int, _p, _ptr, library

__all__ = ["INT_SUM_MAX_K", "W4A8Gemm", "W4A16Gemm", "dequantize_w4"]


class _Mat(ctypes.Structure):
    """``fptq_mat`` of w4a8.c: one weight matrix of a (multi-)GEMM call."""

    _fields_ = [("w", _p), ("ws", _p), ("bias", _p), ("y", _p), ("ldy", _c_i64), ("Np", _c_int), ("N", _c_int),
                ("accumulate", _c_int), ("out_bf16", _c_int), ("si", _p), ("base", _p)]


class _MultiGemm:
    """Products of one input with one or more 4-bit weight matrices (e.g. q, k and v) in one native call. Each
    weight: vnni-packed codes (:func:`fptq.quant.pack_int4_vnni`), float16 group scales transposed and padded to
    ``[G, Np]``, an optional float32 bias, its output width ``N``. All share ``K`` and the group size."""

    def __init__(self, weights: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]], group_size: int):
        self.group_size = group_size
        self.groups = weights[0][1].shape[0]
        self.kp = weights[0][0].shape[1] * 8
        self.ns = [n for _, _, _, n in weights]
        self._keep = weights  # the tensors the pointers below point into
        self._mats = (_Mat * len(weights))()
        for mat, (w, ws, bias, n) in zip(self._mats, weights):
            if (w.dtype != torch.uint8 or ws.dtype != torch.float16 or w.dim() != 3 or w.shape[1] * 8 != self.kp
                    or ws.shape[0] != self.groups or ws.shape[1] != w.shape[0] * 16):
                raise ValueError("native GEMM: weights must share K and the groups (uint8 vnni codes, float16 scales)")
            if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
                raise ValueError("native GEMM: bias must be a contiguous float32 tensor")
            mat.w, mat.ws, mat.bias = w.data_ptr(), ws.data_ptr(), _ptr(bias)
            mat.Np, mat.N = ws.shape[1], n

    def _set_outputs(self, m: int, outs: list[torch.Tensor], accumulate: bool, mats=None) -> None:
        for mat, out, n in zip(self._mats if mats is None else mats, outs, self.ns):
            if out.shape[0] != m or out.shape[1] != n or out.stride(1) != 1:
                raise ValueError(f"native GEMM: output must be [{m}, {n}] with unit column stride")
            mat.y, mat.ldy, mat.accumulate = out.data_ptr(), out.stride(0), int(accumulate)
            mat.out_bf16 = int(out.dtype == torch.bfloat16)


class W4A8Gemm(_MultiGemm):
    """W4A8: int8 activations from :func:`quantize`, integer dot products per group. Weights whose group scales
    are integer multiples of a channel base (:mod:`fptq.quant.intscales`; ``integer_scales``, per matrix, the
    factors or ``None``) are summed over all of K in int32 by the AMX kernel (``|127 * 128|`` per term: up to
    :data:`INT_SUM_MAX_K` inputs)."""

    def __init__(self, weights: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]], group_size: int):
        super().__init__(weights, group_size)
        self.integer_scales = [integer_scale_factors(ws) if self.kp <= INT_SUM_MAX_K else None
                               for _, ws, _, _ in weights]
        for mat, isc in zip(self._mats, self.integer_scales):
            if isc is not None:
                mat.base, mat.si = isc[0].data_ptr(), isc[1].data_ptr()

    def __call__(self, xq: torch.Tensor, xsum: torch.Tensor, sx: torch.Tensor, outs: list[torch.Tensor],
                 accumulate: bool = False) -> list[torch.Tensor]:
        """Write (or, with ``accumulate``, add) each product into ``outs[i]`` (``[M, N_i]`` float32 or bfloat16,
        unit column stride, any row stride: column slices of one buffer work)."""
        m = xq.shape[0]
        self._set_outputs(m, outs, accumulate)
        library().fptq_gemm_w4a8(xq.data_ptr(), xsum.data_ptr(), sx.data_ptr(), m, self.kp, self.groups,
                                 self.group_size, ctypes.addressof(self._mats), len(self.ns), torch.get_num_threads())
        return outs


    @property
    def has_glu(self) -> bool:
        """Whether :meth:`glu` runs here: two matrices of one width (gate and up) and a build with the fused
        call (the AVX-512 ones)."""
        return len(self.ns) == 2 and self.ns[0] == self.ns[1] and hasattr(library(), "fptq_gemm_w4a8_glu")

    def glu(self, xq: torch.Tensor, xsum: torch.Tensor, sx: torch.Tensor, outs: list[torch.Tensor],
            act: torch.Tensor | None, quant=None) -> torch.Tensor | None:
        """``act = silu(gate) * up`` for the two products gate, up (float32 ``[M, N]``, unit column stride): the
        same bits as writing them into ``outs`` and :func:`fptq.kernels.native.silu_mul`, the products of whole
        16-row AMX tiles never stored. ``outs`` (float32 ``[M, N]`` each, e.g. the halves of a gate/up buffer)
        still take the rows that do not fill a tile (every row without AMX). With ``quant`` (a static
        :class:`fptq.kernels.native.QuantOut` with buffers for ``M`` rows) the codes go there instead, as
        ``silu_mul(..., quant=quant)`` writes them, and ``act`` (may be ``None``) is not written; returns ``act``
        or ``None`` then."""
        m = xq.shape[0]
        if not self.has_glu:
            raise ValueError("W4A8Gemm.glu: needs two matrices of one width and an AVX-512 build of the kernels")
        static = quant is not None and quant.mode == 0
        if quant is not None and not static:
            raise ValueError("W4A8Gemm.glu: only a static quantizer writes codes from the kernel")
        if static:
            xq_out = quant.tensors[0]
            if xq_out.shape[0] != m or quant.Kp < self.ns[0]:
                raise ValueError(f"W4A8Gemm.glu: the quantizer's buffers must hold {m} rows of {self.ns[0]} codes")
        if any(o.dtype != torch.float32 for o in outs) or (act is not None and act.dtype != torch.float32):
            raise ValueError("W4A8Gemm.glu: float32 outputs only")
        if act is None and not static:
            raise ValueError("W4A8Gemm.glu: act is needed without a static quantizer")
        if act is not None and (act.shape[0] != m or act.shape[1] != self.ns[0] or act.stride(1) != 1):
            raise ValueError(f"W4A8Gemm.glu: act must be [{m}, {self.ns[0]}] with unit column stride")
        self._set_outputs(m, outs, False)
        library().fptq_gemm_w4a8_glu(xq.data_ptr(), xsum.data_ptr(), sx.data_ptr(), m, self.kp, self.groups,
                                     self.group_size, ctypes.addressof(self._mats), _ptr(act),
                                     0 if act is None else act.stride(0),
                                     ctypes.addressof(quant) if static else None, torch.get_num_threads())
        return None if static else act

    def call(self, xq: torch.Tensor, xsum: torch.Tensor, sx: torch.Tensor, outs: list[torch.Tensor],
             accumulate: bool, nthreads: int) -> tuple:
        """This product bound to its input and outputs (``(function, [arguments])``, see
        :func:`fptq.kernels.native.rmsnorm_call`), on a copy of the weights' descriptors: calls through
        ``__call__`` with other outputs do not disturb it."""
        mats = (_Mat * len(self.ns))()
        ctypes.memmove(mats, self._mats, ctypes.sizeof(mats))
        self._set_outputs(xq.shape[0], outs, accumulate, mats)
        # the descriptor array itself as the pointer argument: the call keeps it alive (the weights live in self)
        return library().fptq_gemm_w4a8, [xq.data_ptr(), xsum.data_ptr(), sx.data_ptr(), xq.shape[0], self.kp,
                                          self.groups, self.group_size, mats, len(self.ns), nthreads]


class W4A16Gemm(_MultiGemm):
    """W4A16: float32 activations ``[M, Kp]`` (zero padded beyond K), float multiply-adds (for small M)."""

    def __call__(self, x: torch.Tensor, outs: list[torch.Tensor], accumulate: bool = False) -> list[torch.Tensor]:
        m = x.shape[0]
        if x.dtype != torch.float32 or x.shape[1] != self.kp or x.stride(1) != 1:
            raise ValueError(f"W4A16Gemm: input must be float32 [M, {self.kp}] with unit column stride")
        self._set_outputs(m, outs, accumulate)
        library().fptq_gemm_w4f(x.data_ptr(), x.stride(0), m, self.kp, self.groups, self.group_size,
                                ctypes.addressof(self._mats), len(self.ns), torch.get_num_threads())
        return outs


def dequantize_w4(w: torch.Tensor, ws_t: torch.Tensor, n: int, k: int, group_size: int,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """bfloat16 ``[n, k]`` weights from vnni-packed codes and ``[G, Np]`` float16 scales."""
    kp = w.shape[1] * 8
    if out is None:
        out = torch.empty(n, k, dtype=torch.bfloat16)
    library().fptq_dequant_w4(w.data_ptr(), ws_t.data_ptr(), ws_t.shape[1], n, k, kp, group_size, out.data_ptr(),
                              out.stride(0), torch.get_num_threads())
    return out
