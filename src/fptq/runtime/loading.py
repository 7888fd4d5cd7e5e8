"""Loading a checkpoint for fptq's runtime, and :func:`load` (``fptq.load``): the transformers model with the
runtime behind its forward."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = ["stored_float_dtype", "stored_dtypes", "keep_stored_dtypes", "load_for_runtime", "load", "RUNTIMES",
           "use_runtime"]

_16 = {"BF16": torch.bfloat16, "F16": torch.float16}
RUNTIMES = ("auto", "off")


def stored_dtypes(out: str | Path) -> dict[str, str]:
    """``{tensor name: safetensors dtype}`` of a checkpoint's weights files (headers only)."""
    from ..io import weight_files
    from ..st import read_header

    names: dict[str, str] = {}
    for f in weight_files(Path(out)):
        header, _ = read_header(Path(out) / f)
        names.update({k: v["dtype"] for k, v in header.items() if k != "__metadata__"})
    return names


def stored_float_dtype(out: str | Path) -> torch.dtype | None:
    """The dtype in which a checkpoint stores its unquantized float tensors (embeddings, norms, ``lm_head``),
    if it is 16-bit; ``None`` otherwise (float32 kept with ``--keep-dtype``)."""
    for name, dt in stored_dtypes(out).items():
        if name.endswith((".qweight", ".w_scales", ".act_scale")):
            continue
        if dt in _16:
            return _16[dt]
        if dt == "F32":
            return None
    return None


def keep_stored_dtypes(model: nn.Module, out: str | Path) -> int:
    """Hold every float32 parameter of ``model`` that the checkpoint ``out`` stores in 16 bits in that 16-bit
    dtype (exact: the values are the stored ones); returns how many tensors changed. What
    :func:`load_for_runtime` builds directly, for a model already loaded in float32."""
    stored = stored_dtypes(out)
    changed = 0
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        dt = _16.get(stored.get(name, ""))
        if dt is None or p.dtype != torch.float32 or id(p) in seen:
            continue
        seen.add(id(p))
        p.data = p.data.to(dt)
        changed += 1
    return changed


def load_for_runtime(out: str | Path, device: str = "cpu", backend: str = "auto"):
    """``fptq.load(out)`` on the transformers modules with the unquantized tensors kept in the 16-bit dtype they
    are stored in (no float32 upcast: half the memory and memory traffic for embeddings and ``lm_head``), ready
    for :class:`~fptq.runtime.Engine`."""
    from ..io import load as load_modules

    dtype = stored_float_dtype(out) if torch.device(device).type == "cpu" else None
    return load_modules(out, device=device, backend=backend, dtype=dtype)


def use_runtime(model: nn.Module, out: str | Path | None = None) -> str | None:
    """Put fptq's runtime behind ``model``'s forward and ``generate`` (:func:`fptq.runtime.hf_fast.attach_runtime`):
    the model becomes inference-only (``requires_grad`` off) and, given its checkpoint ``out``, keeps the
    unquantized tensors in the 16-bit dtype they are stored in, as the runtime computes with them. Returns
    ``None`` when attached, else the reason it could not be (the model is then unchanged)."""
    from .hf_fast import attach_runtime

    reason = attach_runtime(model)
    if reason is not None:
        return reason
    model.requires_grad_(False)
    if out is not None:
        keep_stored_dtypes(model, out)
    return None


def load(out: str | Path, device: str | torch.device = "cpu", backend: str = "auto", verify: bool = True,
         dtype: torch.dtype | None = None, runtime: str = "auto"):
    """Load an fptq checkpoint as a Hugging Face causal LM (``fptq.load``).

    ``runtime="auto"`` (default): on the CPU, for the architectures fptq's runtime covers (LLaMA-shaped, see
    :func:`fptq.runtime.engine_unsupported_reason`) and the integer kernels (``backend`` ``auto``/``native``),
    ``model(...)`` and ``model.generate(...)`` run on :class:`~fptq.runtime.Engine`
    (:mod:`fptq.runtime.hf_fast`): same logits up to float rounding, several times faster. The model is then
    inference-only and its unquantized tensors stay in the 16-bit dtype the checkpoint stores them in (unless
    ``dtype`` is given). Elsewhere, or with ``runtime="off"``, the model runs transformers' forward with fptq's
    kernels in each Linear (:func:`fptq.io.load`: the checkpoint's numerics module by module, as ``fptq eval``
    measures them). The other arguments are :func:`fptq.io.load`'s."""
    from ..errors import FptqError
    from ..io import load as load_modules

    if runtime not in RUNTIMES:
        raise FptqError(f"runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
    model = load_modules(out, device=device, backend=backend, verify=verify, dtype=dtype)
    if runtime == "off":
        return model
    if backend not in ("auto", "native"):
        log.info("fptq.load: transformers' forward with the %r backend (the runtime runs the native kernels)", backend)
        return model
    reason = use_runtime(model, out if dtype is None else None)
    if reason is not None:
        log.info("fptq.load: transformers' forward with fptq's kernels (fptq's runtime: %s)", reason)
    return model
