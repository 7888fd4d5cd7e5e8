"""Kernel backends for :class:`~fptq.nn.QuantLinear`.

Backends (``QuantLinear.backend`` / ``set_backend(name)``):

``reference``
    simulated quantization in float32 (``QuantLinear.reference_forward``);
    any device.
``native``
    CPU (default there when the CPU has AVX-512 VNNI or AVX2 and a C compiler is present): fptq's own kernels, exact
    group-wise W4A8 on the packed 4-bit codes (repacked once in place; no int8 copy), and W4A16 on the same
    codes. See :mod:`fptq.kernels.cpu_native` and :mod:`fptq.kernels.native`.
``int8_perchannel``
    CPU, ``torch._int_mm`` with the group scales folded into per-channel int8
    weights (fast; one extra rounding of the weights; caches 1 byte/weight).
    See :mod:`fptq.kernels.cpu`.
``int8_grouped``
    CPU, ``torch._int_mm`` per group with float group scales (exact
    group-wise; caches 1 byte/weight).
``triton``
    CUDA, picks by the number of tokens M: ``triton_grouped`` for small M
    (decode, memory-bound), ``triton_perchannel`` for large M (prefill).
``triton_grouped``
    CUDA, exact group-wise W4A8 Triton kernels reading the packed int4 weights
    (GEMV kernel for M <= 2 -- on 32-bit words with ``dp4a`` where it covers the
    layer, :mod:`fptq.kernels.triton_dp4a` --, tensor-core kernel with per-group int32
    accumulation and split-K above); same maths as the reference.
``triton_perchannel``
    CUDA, int8 x int8 GEMM on int8 per-channel weights converted from the
    group-scaled int4 ones (the ``int8_perchannel`` conversion: one extra
    rounding; caches 1 byte/weight on the module).
    All ``triton*`` backends quantize activations with a fused Triton kernel
    (bit-identical to ``quantize_input``) and need ``triton`` (``pip install
    fptq[triton]``) and a CUDA device.  See :mod:`fptq.kernels.triton_w4a8`.
``auto``
    the fastest available backend for the input's device (:func:`default_backend`): ``native`` on CPU,
    else ``int8_grouped`` (exact); ``triton`` on CUDA.

``run_backend(name, module, x)`` is what ``QuantLinear.forward`` calls.
"""
from __future__ import annotations

import functools
import importlib.util
from typing import Callable

import torch

__all__ = [
    "BACKENDS",
    "available_backends",
    "default_backend",
    "resolve_backend",
    "run_backend",
    "BackendUnavailableError",
]

BACKENDS = ("reference", "native", "int8_perchannel", "int8_grouped", "triton", "triton_grouped", "triton_perchannel")
_CPU_BACKENDS = ("native", "int8_perchannel", "int8_grouped")
_TRITON_BACKENDS = ("triton", "triton_grouped", "triton_perchannel")


class BackendUnavailableError(RuntimeError):
    """The requested backend exists but cannot run here (missing package or device)."""


def _triton_installed() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


def _as_device(device) -> torch.device:
    if device is None:
        return torch.device("cpu")
    return device if isinstance(device, torch.device) else torch.device(device)


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends that can run on ``device`` (default CPU), fastest-first after ``reference``.

    With ``device=None`` the CPU backends are listed, plus the ``triton*`` ones
    when a CUDA device and the ``triton`` package are present.
    """
    out = ["reference"]
    dev = None if device is None else _as_device(device)
    if dev is None or dev.type == "cpu":
        out += [b for b in _CPU_BACKENDS if b != "native" or _native_available()]
    if (dev is None or dev.type == "cuda") and torch.cuda.is_available() and _triton_installed():
        out += list(_TRITON_BACKENDS)
    return out


def fast_bfloat16(device: torch.device | str) -> bool:
    """Whether bfloat16 matrix products are fast on ``device``: CUDA, or a CPU for which oneDNN has bfloat16
    kernels (AVX-512 and newer); elsewhere (AVX2 CPUs) PyTorch emulates them, slower than float32."""
    return _as_device(device).type != "cpu" or _cpu_fast_bfloat16()


@functools.cache
def _cpu_fast_bfloat16() -> bool:
    """Asked once per process: the runtime's head asks on every forward."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _native_available() -> bool:
    from . import native

    return native.available()


def default_backend(device: torch.device | str | None = None) -> str:
    """The fastest available backend for ``device``: ``native`` on CPU (``int8_grouped``, exact, where the
    native kernels cannot run), ``triton`` on CUDA when installed, else ``reference``."""
    dev = _as_device(device)
    if dev.type == "cpu":
        return "native" if _native_available() else "int8_grouped"
    if dev.type == "cuda" and torch.cuda.is_available() and _triton_installed():
        return "triton"
    return "reference"


def _triton_interpreting() -> bool:
    """Triton's CPU interpreter is on (``TRITON_INTERPRET=1`` before triton was imported): the Triton backends then
    run on CPU tensors too, slowly -- how the GPU code paths are tested without a GPU."""
    import os

    return os.environ.get("TRITON_INTERPRET") == "1" and _triton_installed()


def _check(name: str, device: torch.device) -> None:
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose one of {BACKENDS + ('auto',)}")
    if name == "native" and device.type == "cpu" and not _native_available():
        from . import native

        raise BackendUnavailableError(f"backend 'native' cannot run here: {native.unavailable_reason()}; "
                                      "use 'auto' (falls back to 'int8_grouped') or 'int8_grouped'")
    if name in _CPU_BACKENDS and device.type != "cpu":
        raise BackendUnavailableError(
            f"backend {name!r} runs on CPU tensors only, got a tensor on {device}; "
            f"use 'triton' (CUDA), 'reference' or 'auto'"
        )
    if name in _TRITON_BACKENDS:
        if device.type != "cuda" and not (device.type == "cpu" and _triton_interpreting()):
            raise BackendUnavailableError(
                f"backend {name!r} needs CUDA tensors, got a tensor on {device}; use 'auto' or a CPU backend"
            )
        if not _triton_installed():
            raise BackendUnavailableError(f"backend {name!r} needs the triton package: pip install 'fptq[triton]'")


def resolve_backend(name: str, device: torch.device | str | None = None) -> str:
    """Map ``auto`` to a concrete backend and validate ``name`` for ``device``."""
    dev = _as_device(device)
    if name == "auto":
        return default_backend(dev)
    _check(name, dev)
    return name


def _get_impl(name: str) -> Callable:
    if name == "reference":
        return lambda module, x: module.reference_forward(x)
    if name == "native":
        from .cpu_native import native_forward

        return native_forward
    if name == "int8_perchannel":
        from .cpu import int8_perchannel_forward

        return int8_perchannel_forward
    if name == "int8_grouped":
        from .cpu import int8_grouped_forward

        return int8_grouped_forward
    if name == "triton":
        from .triton_w4a8 import triton_forward

        return triton_forward
    if name == "triton_grouped":
        from .triton_w4a8 import triton_grouped_forward

        return triton_grouped_forward
    if name == "triton_perchannel":
        from .triton_w4a8 import triton_perchannel_forward

        return triton_perchannel_forward
    raise ValueError(f"unknown kernel backend {name!r}")


@torch.compiler.disable
def run_backend(name: str, module, x: torch.Tensor) -> torch.Tensor:
    """Run ``module`` (a QuantLinear) on ``x`` (``[..., K]``) with backend ``name``.

    Never traced by ``torch.compile`` (a graph break: the kernels run as they do eagerly). Traced, the Triton
    backend's launch code failed under Dynamo's fake tensors, which its guard took for a broken kernel and
    answered by falling back to a slower path for the rest of the process."""
    return _get_impl(resolve_backend(name, x.device))(module, x)
