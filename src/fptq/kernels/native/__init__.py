"""fptq's native CPU kernels (AVX-512 VNNI with or without AMX, or AVX2), compiled on first use and called
through ctypes.

Three builds of one interface (:data:`BUILDS`): ``w4a8.c`` with AMX (``avx512_amx``: the W4A8 product of 16
tokens or more on AMX int8 tiles, ``w4a8_amx.h``) and without (``avx512_vnni``) for CPUs with AVX-512 VNNI, and
``w4a8_avx2.c`` for x86-64 CPUs with AVX2, FMA and F16C only (all include ``w4a8_common.h``); the first build
this CPU supports is used, :func:`isa` says which. The builds give the same bits; the AVX2 build lacks only
the bfloat16 prompt attention (:func:`has_bf16` is false there and the runtime uses PyTorch's attention), and only
the AMX build has the bfloat16 output head of many rows (:func:`head_bf16`; elsewhere PyTorch multiplies it).
A source is compiled once per source
version and compiler by the system C compiler (``$CC``, else ``cc``/``gcc``) into ``<fptq cache>/kernels/`` (:func:`fptq.paths.kernels_cache_dir`; the
cache is ``$FPTQ_CACHE``, else ``~/.cache/fptq``), then loaded with :mod:`ctypes`. Nothing is built at install time and nothing else is
needed: no torch headers, no ninja. The OpenMP runtime is the one torch already loaded (same soname), so the
kernels and torch share one thread pool.

:func:`library` returns the loaded library, or ``None`` when this machine cannot use it (neither AVX-512 VNNI
nor AVX2, no C compiler, or the build failed); :func:`unavailable_reason` says why. Callers then use the pure-torch backends.
Set ``FPTQ_NATIVE=0`` to disable the native kernels, ``FPTQ_NATIVE=avx512_vnni`` (or ``avx2``) to use that build
on a CPU that supports a better one.
"""
from __future__ import annotations

import ctypes
import functools

import torch

from .build import (BUILDS, Build, _c_float, _c_i64, _c_int, _compiler, _load, _p, _ptr, available,  # noqa: F401
                    cpu_flags, isa, library, source_path, unavailable_reason)

__all__ = ["library", "available", "unavailable_reason", "quantize", "W4A8Gemm", "W4A16Gemm", "dequantize_w4",
           "QuantOut", "rmsnorm", "silu_mul", "rope_cache", "decode_attention", "quantize_call", "rmsnorm_call",
           "silu_mul_call", "rope_cache_call", "decode_attention_call", "ROPE_COS", "ROPE_SIN", "ROPE_START",
           "ATTENTION_LENGTH",
           "prefill_attention", "has_amx_attention", "cpu_flags", "prefill_attention_work_bytes", "has_bf16", "isa", "source_path", "BUILDS",
           "has_amx_head", "head_bf16"]
class QuantOut(ctypes.Structure):
    """``fptq_qparams`` of w4a8.c: where a fused stage writes its output quantized for the next Linear:
    int8 codes ``[M, Kp]``, group sums ``[M, G]`` (4-bit consumers), per-token scales ``[M]``."""

    _fields_ = [("xq", _p), ("xsum", _p), ("sx", _p), ("mode", _c_int), ("static_scale", _c_float),
                ("qmax", _c_float), ("gs", _c_int), ("G", _c_int), ("Kp", _c_int)]

    @classmethod
    def make(cls, m: int, kp: int, mode: str, static_scale: float | None, qmax: int, group_size: int, groups: int,
             with_sums: bool = True) -> "QuantOut":
        """Quantization parameters and new buffers for ``m`` tokens."""
        q = cls.params(kp, mode, static_scale, qmax, group_size, groups)
        return q.attach(*cls.buffers(m, kp, groups, with_sums))

    @classmethod
    def params(cls, kp: int, mode: str, static_scale: float | None, qmax: int, group_size: int,
               groups: int) -> "QuantOut":
        """Quantization parameters only; :meth:`attach` gives it buffers."""
        q = cls()
        q.tensors = None
        q.mode = 0 if mode == "static_tensor" else 1
        q.static_scale = float(static_scale or 0.0)
        q.qmax, q.gs, q.G, q.Kp = float(qmax), group_size, groups, kp
        return q

    @staticmethod
    def buffers(m: int, kp: int, groups: int, with_sums: bool = True) -> tuple:
        """``(codes [m, kp] int8, group sums [m, groups] int32 or None, scales [m] float32)``."""
        return (torch.empty(m, kp, dtype=torch.int8),
                torch.empty(m, groups, dtype=torch.int32) if with_sums else None, torch.empty(m, dtype=torch.float32))

    def attach(self, xq: torch.Tensor, xsum: torch.Tensor | None, sx: torch.Tensor) -> "QuantOut":
        """Point at these buffers (shapes from :meth:`buffers`; they may be shared by stages run in turn)."""
        if xq.shape[1] != self.Kp or (xsum is not None and xsum.shape[1] != self.G):
            raise ValueError("QuantOut.attach: buffers do not match the quantizer's K / groups")
        self.tensors = (xq, xsum, sx)
        self.xq, self.xsum, self.sx = (_ptr(t) for t in self.tensors)
        return self


# A native call bound to its arguments, ``(function, [arguments])``: ``function(*arguments)`` runs it. The
# ``*_call`` builders below give the arguments of the functions of the same name in the library's order; the
# tensors (and QuantOut structures) they point into must stay alive and in place while the call is used.
# (:class:`fptq.runtime.decode.DecodeProgram` binds a whole decode step once and changes only positions.)


def rmsnorm_call(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None,
                 quant: QuantOut | None, nthreads: int) -> tuple:
    m, d = x.shape
    return library().fptq_rmsnorm, [x.data_ptr(), x.stride(0), m, d, weight.data_ptr(), eps, _ptr(out),
                                    None if quant is None else ctypes.addressof(quant), nthreads]


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None,
            quant: QuantOut | None = None) -> torch.Tensor | None:
    """``x * rsqrt(mean(x**2) + eps) * weight`` over the rows of float32 ``x`` ``[M, D]``, into ``out``
    (float32 ``[M, D]``) and/or quantized into ``quant``."""
    m, d = x.shape
    if out is None and (quant is None or d > 16384):
        out = torch.empty(m, d, dtype=torch.float32)
    fn, args = rmsnorm_call(x, weight, eps, out, quant, torch.get_num_threads())
    fn(*args)
    return out


def silu_mul_call(gu: torch.Tensor, ffn: int, out: torch.Tensor | None, quant: QuantOut | None,
                  nthreads: int) -> tuple:
    return library().fptq_silu_mul, [gu.data_ptr(), gu.stride(0), gu.shape[0], ffn, _ptr(out),
                                     None if quant is None else ctypes.addressof(quant), nthreads]


def silu_mul(gu: torch.Tensor, ffn: int, out: torch.Tensor | None = None,
             quant: QuantOut | None = None) -> torch.Tensor | None:
    """``silu(gu[:, :ffn]) * gu[:, ffn:]`` (float32 ``gu`` ``[M, 2 ffn]``), into ``out`` and/or ``quant``."""
    m = gu.shape[0]
    if out is None and (quant is None or ffn > 32768):
        out = torch.empty(m, ffn, dtype=torch.float32)
    fn, args = silu_mul_call(gu, ffn, out, quant, torch.get_num_threads())
    fn(*args)
    return out


_CACHE_MODES = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}


def _cache_args(kcache: torch.Tensor, kscale: torch.Tensor | None, vscale: torch.Tensor | None) -> tuple:
    """(mode, key scales, value scales) of a cache: float32, bfloat16, or int8 codes with a float32 scale per
    (batch, head, position) ``[B, Hkv, L]``."""
    mode = _CACHE_MODES.get(kcache.dtype)
    if mode is None:
        raise ValueError(f"KV cache dtype {kcache.dtype} not supported (float32, bfloat16, int8)")
    if mode == 2 and (kscale is None or vscale is None):
        raise ValueError("an int8 KV cache needs its scales")
    return mode, _ptr(kscale), _ptr(vscale)


def rope_cache(qkv: torch.Tensor, b: int, t: int, heads: int, kv_heads: int, head_dim: int, cos: torch.Tensor,
               sin: torch.Tensor, q_out: torch.Tensor, kcache: torch.Tensor, vcache: torch.Tensor, start: int,
               kscale: torch.Tensor | None = None, vscale: torch.Tensor | None = None) -> None:
    """Rotary embedding of the queries (into ``q_out`` ``[B, H, T, hd]``) and keys of ``qkv``
    (``[B*T, (H + 2 Hkv) hd]`` float32), keys and values written into the caches ``[B, Hkv, L, hd]`` at
    positions ``start ..`` (int8 caches: codes of ``absmax(row) / 127`` and the scales into ``kscale`` /
    ``vscale`` ``[B, Hkv, L]``). ``cos``/``sin``: ``[T, hd]`` float32."""
    fn, args = rope_cache_call(qkv, b, t, heads, kv_heads, head_dim, cos.data_ptr(), sin.data_ptr(), q_out, kcache,
                               vcache, start, kscale, vscale, torch.get_num_threads())
    fn(*args)


ROPE_COS, ROPE_SIN, ROPE_START = 7, 8, 16  # rope_cache_call's arguments that move with the position


def rope_cache_call(qkv: torch.Tensor, b: int, t: int, heads: int, kv_heads: int, head_dim: int, cos_ptr: int,
                    sin_ptr: int, q_out: torch.Tensor, kcache: torch.Tensor, vcache: torch.Tensor, start: int,
                    kscale: torch.Tensor | None, vscale: torch.Tensor | None, nthreads: int) -> tuple:
    """:func:`rope_cache`'s call; ``cos_ptr``/``sin_ptr``: addresses of the rows ``[T, hd]`` float32."""
    mode, ks, vs = _cache_args(kcache, kscale, vscale)
    return library().fptq_rope_cache, [qkv.data_ptr(), qkv.stride(0), b, t, heads, kv_heads, head_dim, cos_ptr,
                                       sin_ptr, q_out.data_ptr(), kcache.data_ptr(), vcache.data_ptr(), mode, ks, vs,
                                       kcache.shape[2], start, nthreads]


def decode_attention(q: torch.Tensor, kcache: torch.Tensor, vcache: torch.Tensor, length: int, scale: float,
                     out: torch.Tensor | None = None, kscale: torch.Tensor | None = None,
                     vscale: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one new query per sequence: ``q`` ``[B, H, hd]`` float32 over the first ``length``
    positions of the caches ``[B, Hkv, L, hd]`` (float32 or bfloat16; query head ``h`` reads key/value head
    ``h // (H // Hkv)``). ``hd`` must be a multiple of 16 (at most 128)."""
    b, h, hd = q.shape
    if out is None:
        out = torch.empty(b, h, hd, dtype=torch.float32)
    fn, args = decode_attention_call(q, kcache, vcache, length, scale, out, kscale, vscale, torch.get_num_threads())
    fn(*args)
    return out


ATTENTION_LENGTH = 11  # decode_attention_call's argument that moves with the position


def decode_attention_call(q: torch.Tensor, kcache: torch.Tensor, vcache: torch.Tensor, length: int, scale: float,
                          out: torch.Tensor, kscale: torch.Tensor | None, vscale: torch.Tensor | None,
                          nthreads: int) -> tuple:
    b, h, hd = q.shape
    mode, ks, vs = _cache_args(kcache, kscale, vscale)
    return library().fptq_decode_attention, [q.data_ptr(), kcache.data_ptr(), vcache.data_ptr(), mode, ks, vs, b, h,
                                             kcache.shape[1], hd, kcache.shape[2], length, scale, out.data_ptr(),
                                             nthreads]


@functools.cache
def has_bf16() -> bool:
    """Whether the CPU has AVX512-BF16 (used by :func:`prefill_attention`)."""
    lib = library()
    return bool(lib is not None and lib.fptq_cpu_has_bf16())


def has_amx_attention() -> bool:
    """Whether :func:`prefill_attention` runs on AMX-BF16 tiles here (the ``avx512_amx`` build on a CPU with
    AMX-BF16) for a bfloat16 cache and a head size that is a multiple of 32."""
    lib = library()
    return bool(lib is not None and hasattr(lib, "fptq_prefill_attention") and lib.fptq_prefill_attention_amx())


def has_amx_head() -> bool:
    """Whether :func:`head_bf16` multiplies on AMX-BF16 tiles here (the ``avx512_amx`` build on a CPU with
    AMX-BF16)."""
    return has_amx_attention()  # the same build and CPU check


def head_bf16(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """``x @ weight.T`` for bfloat16 ``x`` ``[M, K]`` and ``weight`` ``[V, K]`` (both contiguous) on AMX-BF16 tiles:
    float32 sums of the exact products rounded to bfloat16, a new ``[M, V]`` bfloat16 tensor (the values of PyTorch's
    bfloat16 ``F.linear`` up to the order in which its float32 sums are taken). ``None`` where :func:`has_amx_head`
    is false or ``K`` is not a multiple of 32: the caller multiplies otherwise."""
    if x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16 or x.dim() != 2 or weight.dim() != 2:
        raise ValueError("head_bf16: x [M, K] and weight [V, K] must be bfloat16 matrices")
    if not (x.is_contiguous() and weight.is_contiguous()) or x.shape[1] != weight.shape[1]:
        raise ValueError(f"head_bf16: contiguous x [M, K] and weight [V, K] with one K (got {list(x.shape)} and "
                         f"{list(weight.shape)})")
    m, k = x.shape
    if k % 32 or m == 0 or not has_amx_head():
        return None
    out = torch.empty(m, weight.shape[0], dtype=torch.bfloat16)
    done = library().fptq_head_bf16(x.data_ptr(), weight.data_ptr(), out.data_ptr(), m, k, weight.shape[0],
                                    torch.get_num_threads())
    return out if done else None


def prefill_attention(q: torch.Tensor, kcache: torch.Tensor, vcache: torch.Tensor, start: int, scale: float,
                      out: torch.Tensor | None = None, kscale: torch.Tensor | None = None,
                      vscale: torch.Tensor | None = None, work: torch.Tensor | None = None,
                      tokens_major: bool = False) -> torch.Tensor:
    """Causal attention of the queries ``q`` ``[B, H, T, hd]`` (float32, positions ``start .. start+T-1``) over
    the caches ``[B, Hkv, L, hd]`` holding positions ``0 .. start+T-1``; query ``i`` sees keys ``0 .. start+i``.
    Dot products in bfloat16 with float32 accumulation and softmax (needs :func:`has_bf16`): on AMX-BF16 tiles
    for a bfloat16 cache where :func:`has_amx_attention` (``hd`` a multiple of 32 up to 256), else a flash kernel
    (``hd`` 64 or 128). The output is float32 ``[B, H, T, hd]``, or ``[B, T, H, hd]`` with ``tokens_major`` (the
    rows of the output projection's input). ``work``: an optional uint8 scratch buffer
    (:func:`prefill_attention_work_bytes`), reused between calls."""
    b, h, t, hd = q.shape
    lib = library()
    need = lib.fptq_prefill_attention_work(b, kcache.shape[1], hd, start + t)
    if work is None or work.numel() < need:
        work = torch.empty(need, dtype=torch.uint8)
    shape = (b, t, h, hd) if tokens_major else (b, h, t, hd)
    if out is None:
        out = torch.empty(shape, dtype=torch.float32)
    elif tuple(out.shape) != shape or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"prefill_attention: out must be a contiguous float32 {list(shape)} tensor")
    mode, ks, vs = _cache_args(kcache, kscale, vscale)
    lib.fptq_prefill_attention(q.data_ptr(), kcache.data_ptr(), vcache.data_ptr(), mode, ks, vs, b, h,
                               kcache.shape[1], hd, kcache.shape[2], start, t, scale, out.data_ptr(),
                               int(tokens_major), work.data_ptr(), torch.get_num_threads())
    return out


def prefill_attention_work_bytes(b: int, kv_heads: int, head_dim: int, end: int) -> int:
    return int(library().fptq_prefill_attention_work(b, kv_heads, head_dim, end))


def quantize(x2d: torch.Tensor, kp: int, mode: str, static_scale: torch.Tensor | None, qmax: int,
             group_size: int, groups: int, with_sums: bool = True):
    """int8 codes ``[M, kp]`` (zero padded), per-token scales ``[M]`` and, with ``with_sums``, group sums of the
    codes ``[M, groups]`` of ``x2d`` (``[M, K]`` float32 or bfloat16, rows contiguous). ``mode``:
    ``static_tensor`` (one scale) or ``dynamic_token`` (``absmax(row) / qmax``); bit-identical to
    :func:`fptq.quant.quantize_static` / :func:`fptq.quant.quantize_per_token`."""
    m, k = x2d.shape
    if x2d.stride(1) != 1:
        x2d = x2d.contiguous()
    if x2d.dtype not in (torch.float32, torch.bfloat16):
        x2d = x2d.float()
    xq = torch.empty(m, kp, dtype=torch.int8)
    sx = torch.empty(m, dtype=torch.float32)
    xs = torch.empty(m, groups, dtype=torch.int32) if with_sums else None
    fn, args = quantize_call(x2d, kp, mode, static_scale, qmax, group_size, groups, (xq, xs, sx),
                             torch.get_num_threads())
    fn(*args)
    return xq, xs, sx


def quantize_call(x2d: torch.Tensor, kp: int, mode: str, static_scale, qmax: int, group_size: int, groups: int,
                  buffers: tuple, nthreads: int) -> tuple:
    """:func:`quantize`'s call into ``buffers`` (:meth:`QuantOut.buffers`); ``x2d`` float32 or bfloat16 with unit
    column stride."""
    m, k = x2d.shape
    xq, xs, sx = buffers
    s = float(static_scale) if mode == "static_tensor" else 0.0
    return library().fptq_quantize, [x2d.data_ptr(), int(x2d.dtype == torch.bfloat16), m, k, x2d.stride(0),
                                     0 if mode == "static_tensor" else 1, s, float(qmax), group_size, groups, kp,
                                     xq.data_ptr(), _ptr(xs), sx.data_ptr(), nthreads]


from .gemm import W4A8Gemm, W4A16Gemm, dequantize_w4  # noqa: E402  (they call library())
