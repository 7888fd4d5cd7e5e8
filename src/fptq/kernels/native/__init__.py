"""fptq's native CPU kernels (AVX-512 VNNI, or AVX2), compiled on first use and called through ctypes.

Two builds of one interface (:data:`BUILDS`): ``w4a8.c`` for CPUs with AVX-512 VNNI and ``w4a8_avx2.c`` for
x86-64 CPUs with AVX2, FMA and F16C only (both include ``w4a8_common.h``); the first build this CPU supports is
used, :func:`isa` says which. The AVX2 build gives the same results; it lacks only the bfloat16 prompt attention
(:func:`has_bf16` is false there and the runtime uses PyTorch's attention). A source is compiled once per source
version and compiler by the system C compiler (``$CC``, else ``cc``/``gcc``) into ``<fptq cache>/kernels/`` (:func:`fptq.paths.kernels_cache_dir`; the
cache is ``$FPTQ_CACHE``, else ``~/.cache/fptq``), then loaded with :mod:`ctypes`. Nothing is built at install time and nothing else is
needed: no torch headers, no ninja. The OpenMP runtime is the one torch already loaded (same soname), so the
kernels and torch share one thread pool.

:func:`library` returns the loaded library, or ``None`` when this machine cannot use it (neither AVX-512 VNNI
nor AVX2, no C compiler, or the build failed); :func:`unavailable_reason` says why. Callers then use the pure-torch backends.
Set ``FPTQ_NATIVE=0`` to disable the native kernels, ``FPTQ_NATIVE=avx2`` to use the AVX2 build on an AVX-512 CPU.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch

from ...paths import kernels_cache_dir

log = logging.getLogger(__name__)

__all__ = ["library", "available", "unavailable_reason", "quantize", "W4A8Gemm", "W4A16Gemm", "dequantize_w4",
           "QuantOut", "rmsnorm", "silu_mul", "rope_cache", "decode_attention",
           "prefill_attention", "prefill_attention_work_bytes", "has_bf16", "isa", "source_path", "BUILDS"]

_DIR = Path(__file__).parent
_COMMON = ("-O3", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno")


class Build(NamedTuple):
    """One build of the kernels: its instruction set, C source and compiler flags."""

    isa: str
    source: str
    flags: tuple[str, ...]


# In order of preference: the first whose library says the CPU supports it is used.
BUILDS = (
    Build("avx512_vnni", "w4a8.c", _COMMON + ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mavx512dq",
                                               "-mfma", "-mf16c")),
    Build("avx2", "w4a8_avx2.c", _COMMON + ("-mavx2", "-mfma", "-mf16c")),
)
_HEADER = "w4a8_common.h"


def source_path() -> Path:
    """The AVX-512 source (the reference build)."""
    return _DIR / BUILDS[0].source


def _compiler() -> str | None:
    for c in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if c and shutil.which(c):
            return shutil.which(c)
    return None


def _build(cc: str, build: Build) -> Path:
    src = (_DIR / build.source).read_bytes() + (_DIR / _HEADER).read_bytes()
    key = hashlib.sha256(src + " ".join(build.flags).encode() + cc.encode()).hexdigest()[:16]
    out = kernels_cache_dir() / f"fptq_w4a8_{build.isa}-{key}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        log.info("compiling fptq's native CPU kernels for %s (once) into %s", build.isa, out)
        r = subprocess.run([cc, *build.flags, str(_DIR / build.source), "-o", tmp, "-lm"], capture_output=True,
                           text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{cc} failed: {r.stderr.strip()[:2000]}")
        os.replace(tmp, out)  # atomic: a concurrent build or an interrupted one never leaves a half file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


_c_int, _c_i64, _c_float, _p = ctypes.c_int, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p


def _declare(lib) -> None:
    lib.fptq_cpu_supported.restype = _c_int
    lib.fptq_native_version.restype = _c_int
    lib.fptq_quantize.restype = None
    lib.fptq_quantize.argtypes = [_p, _c_int, _c_int, _c_int, _c_i64, _c_int, _c_float, _c_float, _c_int, _c_int,
                                  _c_int, _p, _p, _p, _c_int]
    lib.fptq_gemm_w4a8.restype = None
    lib.fptq_gemm_w4a8.argtypes = [_p, _p, _p, _c_int, _c_int, _c_int, _c_int, _p, _c_int, _c_int]
    lib.fptq_gemm_w4f.restype = None
    lib.fptq_gemm_w4f.argtypes = [_p, _c_i64, _c_int, _c_int, _c_int, _c_int, _p, _c_int, _c_int]
    lib.fptq_rmsnorm.restype = None
    lib.fptq_rmsnorm.argtypes = [_p, _c_i64, _c_int, _c_int, _p, _c_float, _p, _p, _c_int]
    lib.fptq_silu_mul.restype = None
    lib.fptq_silu_mul.argtypes = [_p, _c_i64, _c_int, _c_int, _p, _p, _c_int]
    lib.fptq_rope_cache.restype = None
    lib.fptq_rope_cache.argtypes = [_p, _c_i64, _c_int, _c_int, _c_int, _c_int, _c_int, _p, _p, _p, _p, _p, _c_int,
                                    _p, _p, _c_int, _c_int, _c_int]
    lib.fptq_decode_attention.restype = None
    lib.fptq_decode_attention.argtypes = [_p, _p, _p, _c_int, _p, _p, _c_int, _c_int, _c_int, _c_int, _c_int, _c_int,
                                          _c_float, _p, _c_int]
    lib.fptq_cpu_has_bf16.restype = _c_int
    lib.fptq_prefill_attention_work.restype = _c_i64
    lib.fptq_prefill_attention_work.argtypes = [_c_int, _c_int, _c_int, _c_int]
    lib.fptq_dequant_w4.restype = None
    lib.fptq_dequant_w4.argtypes = [_p, _p, _c_int, _c_int, _c_int, _c_int, _c_int, _p, _c_i64, _c_int]
    if not hasattr(lib, "fptq_prefill_attention"):  # the AVX2 build has no bfloat16 prompt attention
        return
    lib.fptq_prefill_attention.restype = None
    lib.fptq_prefill_attention.argtypes = [_p, _p, _p, _c_int, _p, _p, _c_int, _c_int, _c_int, _c_int, _c_int, _c_int,
                                           _c_int, _c_float, _p, _p, _c_int]


class _Mat(ctypes.Structure):
    """``fptq_mat`` of w4a8.c: one weight matrix of a (multi-)GEMM call."""

    _fields_ = [("w", _p), ("ws", _p), ("bias", _p), ("y", _p), ("ldy", _c_i64), ("Np", _c_int), ("N", _c_int),
                ("accumulate", _c_int), ("out_bf16", _c_int)]


@functools.cache
def _load() -> tuple[object | None, str, str]:
    """``(library, isa, why not)``: the first of :data:`BUILDS` that builds and that this CPU supports."""
    choice = os.environ.get("FPTQ_NATIVE", "1")
    if choice == "0":
        return None, "", "disabled by FPTQ_NATIVE=0"
    builds = BUILDS if choice in ("", "1") else tuple(b for b in BUILDS if b.isa == choice)
    if not builds:
        why = (f"FPTQ_NATIVE={choice!r} is not a setting: 0 (off), 1 (the best build this CPU supports) or a build: "
               f"{', '.join(b.isa for b in BUILDS)}")
        log.warning("%s; the native kernels are off", why)
        return None, "", why
    if sys.platform != "linux" or os.uname().machine not in ("x86_64", "AMD64"):
        return None, "", f"the native kernels are for x86-64 Linux (this is {sys.platform} {os.uname().machine})"
    cc = _compiler()
    if cc is None:
        return None, "", "no C compiler found (install gcc, or set CC)"
    failures = []
    for build in builds:
        try:
            lib = ctypes.CDLL(str(_build(cc, build)))
            _declare(lib)
        except (OSError, RuntimeError, AttributeError) as e:
            failures.append(f"building the {build.isa} kernels failed: {e}")
            continue
        if lib.fptq_cpu_supported():
            return lib, build.isa, ""
        failures.append(f"this CPU lacks {build.isa.replace('_', ' ').upper().replace('AVX512', 'AVX-512')}")
    return None, "", "; ".join(failures)


def library():
    """The loaded native library, or ``None`` (see :func:`unavailable_reason`)."""
    return _load()[0]


def available() -> bool:
    return library() is not None


def unavailable_reason() -> str:
    return _load()[2]


def isa() -> str:
    """The instruction set of the loaded build (``"avx512_vnni"`` or ``"avx2"``), or ``""`` when unavailable."""
    return _load()[1]


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


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None,
            quant: QuantOut | None = None) -> torch.Tensor | None:
    """``x * rsqrt(mean(x**2) + eps) * weight`` over the rows of float32 ``x`` ``[M, D]``, into ``out``
    (float32 ``[M, D]``) and/or quantized into ``quant``."""
    m, d = x.shape
    if out is None and (quant is None or d > 16384):
        out = torch.empty(m, d, dtype=torch.float32)
    library().fptq_rmsnorm(x.data_ptr(), x.stride(0), m, d, weight.data_ptr(), eps, _ptr(out),
                           None if quant is None else ctypes.addressof(quant), torch.get_num_threads())
    return out


def silu_mul(gu: torch.Tensor, ffn: int, out: torch.Tensor | None = None,
             quant: QuantOut | None = None) -> torch.Tensor | None:
    """``silu(gu[:, :ffn]) * gu[:, ffn:]`` (float32 ``gu`` ``[M, 2 ffn]``), into ``out`` and/or ``quant``."""
    m = gu.shape[0]
    if out is None and (quant is None or ffn > 32768):
        out = torch.empty(m, ffn, dtype=torch.float32)
    library().fptq_silu_mul(gu.data_ptr(), gu.stride(0), m, ffn, _ptr(out),
                            None if quant is None else ctypes.addressof(quant), torch.get_num_threads())
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
    mode, ks, vs = _cache_args(kcache, kscale, vscale)
    library().fptq_rope_cache(qkv.data_ptr(), qkv.stride(0), b, t, heads, kv_heads, head_dim, cos.data_ptr(),
                              sin.data_ptr(), q_out.data_ptr(), kcache.data_ptr(), vcache.data_ptr(), mode, ks, vs,
                              kcache.shape[2], start, torch.get_num_threads())


def decode_attention(q: torch.Tensor, kcache: torch.Tensor, vcache: torch.Tensor, length: int, scale: float,
                     out: torch.Tensor | None = None, kscale: torch.Tensor | None = None,
                     vscale: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one new query per sequence: ``q`` ``[B, H, hd]`` float32 over the first ``length``
    positions of the caches ``[B, Hkv, L, hd]`` (float32 or bfloat16; query head ``h`` reads key/value head
    ``h // (H // Hkv)``). ``hd`` must be a multiple of 16 (at most 128)."""
    b, h, hd = q.shape
    if out is None:
        out = torch.empty(b, h, hd, dtype=torch.float32)
    mode, ks, vs = _cache_args(kcache, kscale, vscale)
    library().fptq_decode_attention(q.data_ptr(), kcache.data_ptr(), vcache.data_ptr(), mode, ks, vs, b, h,
                                    kcache.shape[1], hd, kcache.shape[2], length, scale, out.data_ptr(),
                                    torch.get_num_threads())
    return out


@functools.cache
def has_bf16() -> bool:
    """Whether the CPU has AVX512-BF16 (used by :func:`prefill_attention`)."""
    lib = library()
    return bool(lib is not None and lib.fptq_cpu_has_bf16())


def prefill_attention(q: torch.Tensor, kcache: torch.Tensor, vcache: torch.Tensor, start: int, scale: float,
                      out: torch.Tensor | None = None, kscale: torch.Tensor | None = None,
                      vscale: torch.Tensor | None = None, work: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of the queries ``q`` ``[B, H, T, hd]`` (float32, positions ``start .. start+T-1``) over
    the caches ``[B, Hkv, L, hd]`` holding positions ``0 .. start+T-1``; query ``i`` sees keys ``0 .. start+i``.
    Dot products in bfloat16 with float32 accumulation and softmax (needs :func:`has_bf16`); ``hd`` 64 or 128.
    ``work``: an optional uint8 scratch buffer (:func:`prefill_attention_work_bytes`), reused between calls."""
    b, h, t, hd = q.shape
    lib = library()
    need = lib.fptq_prefill_attention_work(b, kcache.shape[1], hd, start + t)
    if work is None or work.numel() < need:
        work = torch.empty(need, dtype=torch.uint8)
    if out is None:
        out = torch.empty(b, h, t, hd, dtype=torch.float32)
    mode, ks, vs = _cache_args(kcache, kscale, vscale)
    lib.fptq_prefill_attention(q.data_ptr(), kcache.data_ptr(), vcache.data_ptr(), mode, ks, vs, b, h,
                               kcache.shape[1], hd, kcache.shape[2], start, t, scale, out.data_ptr(),
                               work.data_ptr(), torch.get_num_threads())
    return out


def prefill_attention_work_bytes(b: int, kv_heads: int, head_dim: int, end: int) -> int:
    return int(library().fptq_prefill_attention_work(b, kv_heads, head_dim, end))


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def quantize(x2d: torch.Tensor, kp: int, mode: str, static_scale: torch.Tensor | None, qmax: int,
             group_size: int, groups: int, with_sums: bool = True):
    """int8 codes ``[M, kp]`` (zero padded), per-token scales ``[M]`` and, with ``with_sums``, group sums of the
    codes ``[M, groups]`` of ``x2d`` (``[M, K]`` float32 or bfloat16, rows contiguous). ``mode``:
    ``static_tensor`` (one scale) or ``dynamic_token`` (``absmax(row) / qmax``); bit-identical to
    :func:`fptq.quant.quantize_static` / :func:`fptq.quant.quantize_per_token`."""
    lib = library()
    m, k = x2d.shape
    if x2d.stride(1) != 1:
        x2d = x2d.contiguous()
    if x2d.dtype not in (torch.float32, torch.bfloat16):
        x2d = x2d.float()
    xq = torch.empty(m, kp, dtype=torch.int8)
    sx = torch.empty(m, dtype=torch.float32)
    xs = torch.empty(m, groups, dtype=torch.int32) if with_sums else None
    s = float(static_scale) if mode == "static_tensor" else 0.0
    lib.fptq_quantize(x2d.data_ptr(), int(x2d.dtype == torch.bfloat16), m, k, x2d.stride(0),
                      0 if mode == "static_tensor" else 1, s, float(qmax), group_size, groups, kp,
                      xq.data_ptr(), _ptr(xs), sx.data_ptr(), torch.get_num_threads())
    return xq, xs, sx


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

    def _set_outputs(self, m: int, outs: list[torch.Tensor], accumulate: bool) -> None:
        for mat, out, n in zip(self._mats, outs, self.ns):
            if out.shape[0] != m or out.shape[1] != n or out.stride(1) != 1:
                raise ValueError(f"native GEMM: output must be [{m}, {n}] with unit column stride")
            mat.y, mat.ldy, mat.accumulate = out.data_ptr(), out.stride(0), int(accumulate)
            mat.out_bf16 = int(out.dtype == torch.bfloat16)


class W4A8Gemm(_MultiGemm):
    """W4A8: int8 activations from :func:`quantize`, integer dot products per group."""

    def __call__(self, xq: torch.Tensor, xsum: torch.Tensor, sx: torch.Tensor, outs: list[torch.Tensor],
                 accumulate: bool = False) -> list[torch.Tensor]:
        """Write (or, with ``accumulate``, add) each product into ``outs[i]`` (``[M, N_i]`` float32 or bfloat16,
        unit column stride, any row stride: column slices of one buffer work)."""
        m = xq.shape[0]
        self._set_outputs(m, outs, accumulate)
        library().fptq_gemm_w4a8(xq.data_ptr(), xsum.data_ptr(), sx.data_ptr(), m, self.kp, self.groups,
                                 self.group_size, ctypes.addressof(self._mats), len(self.ns), torch.get_num_threads())
        return outs


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
