"""Loading a checkpoint for fptq's runtime: the unquantized tensors in the 16-bit dtype they are stored in."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

__all__ = ["stored_float_dtype", "stored_dtypes", "keep_stored_dtypes", "load_for_runtime"]

_16 = {"BF16": torch.bfloat16, "F16": torch.float16}


def stored_dtypes(out: str | Path) -> dict[str, str]:
    """``{tensor name: safetensors dtype}`` of a checkpoint's weights files (headers only), as the loaded model
    has them: a head stored as the embedding times a transform (:mod:`fptq.stored_head`) in the embedding's."""
    from ..io import read_quantization_config, weight_files
    from ..st import read_header
    from ..stored_head import head_spec

    names: dict[str, str] = {}
    for f in weight_files(Path(out)):
        header, _ = read_header(Path(out) / f)
        names.update({k: v["dtype"] for k, v in header.items() if k != "__metadata__"})
    spec = head_spec(read_quantization_config(Path(out))[1])
    if spec is not None and spec["embedding"] in names:
        names.pop(spec["transform"], None)
        names[spec["head"]] = names[spec["embedding"]]
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
