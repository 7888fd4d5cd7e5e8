"""Loading a checkpoint for fptq's runtime."""
from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["stored_float_dtype", "load_for_runtime"]

_16 = {"BF16": torch.bfloat16, "F16": torch.float16}


def stored_float_dtype(out: str | Path) -> torch.dtype | None:
    """The dtype in which a checkpoint stores its unquantized float tensors (embeddings, norms, ``lm_head``),
    if it is 16-bit; ``None`` otherwise (float32 kept with ``--keep-dtype``)."""
    from safetensors import safe_open

    from ..io import weight_files

    for f in weight_files(Path(out)):
        with safe_open(str(Path(out) / f), framework="pt") as sf:
            for name in sf.keys():
                if name.endswith((".qweight", ".w_scales", ".act_scale")):
                    continue
                dt = sf.get_slice(name).get_dtype()
                if dt in _16:
                    return _16[dt]
                if dt == "F32":
                    return None
    return None


def load_for_runtime(out: str | Path, device: str = "cpu", backend: str = "auto"):
    """``fptq.load(out)`` with the unquantized tensors kept in the 16-bit dtype they are stored in (no float32
    upcast: half the memory and memory traffic for embeddings and ``lm_head``), ready for
    :class:`~fptq.runtime.Engine`."""
    from ..io import load

    dtype = stored_float_dtype(out) if torch.device(device).type == "cpu" else None
    return load(out, device=device, backend=backend, dtype=dtype)
