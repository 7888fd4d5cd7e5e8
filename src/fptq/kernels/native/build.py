"""Building and loading fptq's native kernels: the builds (:data:`BUILDS`), compiling the first one the CPU
supports with the system C compiler into the kernels cache, and the ctypes declarations of its functions
(see :mod:`fptq.kernels.native`)."""
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

log = logging.getLogger("fptq.kernels.native")

__all__ = ["BUILDS", "Build", "library", "available", "unavailable_reason", "isa", "source_path", "cpu_flags"]

_DIR = Path(__file__).parent
_COMMON = ("-O3", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno", "-ffp-contract=off")  # float steps in written order: both builds agree


class Build(NamedTuple):
    """One build of the kernels: its instruction set, C source, compiler flags, and the ``/proc/cpuinfo`` flags
    without which it is not even compiled (its library still checks the CPU itself)."""

    isa: str
    source: str
    flags: tuple[str, ...]
    requires: tuple[str, ...] = ()


_AVX512 = _COMMON + ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mavx512dq", "-mfma", "-mf16c")
# In order of preference: the first whose library says the CPU supports it is used. avx512_amx is the AVX-512
# build with the W4A8 product of 16 tokens or more on AMX int8 tiles (w4a8_amx.h): the same bits.
BUILDS = (
    Build("avx512_amx", "w4a8.c", _AVX512 + ("-mamx-tile", "-mamx-int8", "-mamx-bf16", "-DFPTQ_AMX"), ("amx_tile", "amx_int8")),
    Build("avx512_vnni", "w4a8.c", _AVX512),
    Build("avx2", "w4a8_avx2.c", _COMMON + ("-mavx2", "-mfma", "-mf16c")),
)
_HEADERS = ("w4a8_common.h", "w4a8_amx.h", "w4a8_attn_amx.h", "head_amx.h")


def source_path() -> Path:
    """The AVX-512 source (the reference build)."""
    return _DIR / BUILDS[0].source


def _compiler() -> str | None:
    for c in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if c and shutil.which(c):
            return shutil.which(c)
    return None


def _build(cc: str, build: Build) -> Path:
    src = (_DIR / build.source).read_bytes() + b"".join((_DIR / h).read_bytes() for h in _HEADERS)
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
    if hasattr(lib, "fptq_gemm_w4a8_glu"):  # the AVX-512 builds
        lib.fptq_gemm_w4a8_glu.restype = None
        lib.fptq_gemm_w4a8_glu.argtypes = [_p, _p, _p, _c_int, _c_int, _c_int, _c_int, _p, _p, _c_i64, _p, _c_int]
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
    if not hasattr(lib, "fptq_prefill_attention"):  # the AVX2 build has no bfloat16 prompt attention or head
        return
    lib.fptq_prefill_attention.restype = None
    lib.fptq_prefill_attention.argtypes = [_p, _p, _p, _c_int, _p, _p, _c_int, _c_int, _c_int, _c_int, _c_int, _c_int,
                                           _c_int, _c_float, _p, _c_int, _p, _c_int]
    lib.fptq_prefill_attention_amx.restype = _c_int
    lib.fptq_head_bf16.restype = _c_int
    lib.fptq_head_bf16.argtypes = [_p, _p, _p, _c_int, _c_int, _c_int, _c_int]


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux lists them (``/proc/cpuinfo``; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


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
    have = cpu_flags()
    for build in builds:
        missing = [f for f in build.requires if f not in have]
        if missing:
            failures.append(f"this CPU lacks {', '.join(missing)} (the {build.isa} build)")
            continue
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
    """The instruction set of the loaded build (``"avx512_amx"``, ``"avx512_vnni"`` or ``"avx2"``), or ``""`` when
    unavailable."""
    return _load()[1]


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()
