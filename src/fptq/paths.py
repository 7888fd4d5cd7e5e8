"""Where fptq keeps files by default: the cache folder and the rooms inside it.

The bottom of the package: it imports nothing of fptq's, so any layer (kernels, models, qat, ...) may
ask it for a location without pulling in another layer.
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir", "models_cache_dir", "kernels_cache_dir", "generated_data_dir"]


def cache_dir() -> Path:
    """fptq's cache folder: ``$FPTQ_CACHE`` when set, else ``$XDG_CACHE_HOME/fptq``, else ``~/.cache/fptq``.

    It holds the GGUF models converted to Hugging Face directories (:func:`models_cache_dir`), the compiled
    native kernels (:func:`kernels_cache_dir`) and the data the float model generated for QAT and ``--calib
    self`` (:func:`generated_data_dir`). Anything in it can be deleted; it is rebuilt on first use. The test
    suite sets ``FPTQ_CACHE`` to a new empty folder, so every run converts the default model from its GGUF."""
    root = os.environ.get("FPTQ_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fptq"
    )
    return Path(root)


def models_cache_dir() -> Path:
    """Converted models (``<cache>/models/<name>``), one folder per GGUF file, converted once."""
    return cache_dir() / "models"


def kernels_cache_dir() -> Path:
    """Compiled native CPU kernels (``<cache>/kernels``), one library per source version and compiler."""
    return cache_dir() / "kernels"


def generated_data_dir() -> Path:
    """Token ids the float model generated (``<cache>/generated``): QAT training data and ``--calib self``."""
    return cache_dir() / "generated"
