"""GGUF metadata of an exported model: the llama.cpp architecture of a Hugging Face model type, the
hyper-parameters, and the tokenizer.

Two sources:

* the GGUF file the model came from (fptq converts GGUF models to Hugging Face directories once, and
  records the file in ``fptq_source.json``): its ``general.*``, ``<arch>.*`` and ``tokenizer.*`` keys are
  copied value for value and type for type (except ``general.file_type``, ``general.quantization_version``
  and ``general.quantized_by``, which describe the new file), after checking that it describes the
  same model (architecture, layers, width, vocabulary);
* otherwise the Hugging Face files: hyper-parameters from ``config.json``, the vocabulary converted with
  the ``gguf`` package's helpers (:class:`gguf.vocab.BpeVocab` for GPT-2 style byte-level BPE, as LLaMA 3,
  SmolLM and Qwen2 use; :class:`gguf.vocab.LlamaHfVocab` for LLaMA 1/2 style BPE with byte fallback),
  special tokens, merges and chat template by :class:`gguf.vocab.SpecialVocab`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import FptqError

__all__ = ["GGUFArch", "gguf_arch", "add_source_metadata", "add_hf_metadata", "find_source_gguf",
           "bpe_pre_tokenizer", "SOURCE_NAME"]

SOURCE_NAME = "fptq_source.json"  # written next to a model converted from GGUF (fptq.models.loading)

# keys of the source file that describe the file, not the model: rewritten for the exported file
_FILE_KEYS = ("general.architecture", "general.file_type", "general.quantization_version", "general.quantized_by")


@dataclass(frozen=True)
class GGUFArch:
    """A llama.cpp architecture: its name in GGUF and whether q/k rows are reordered.

    ``rope_permute``: llama.cpp's ``llama`` architecture rotates pairs of adjacent rows of each head
    (GGML's RoPE), Hugging Face's LLaMA the two halves of a head (rotate-half): q_proj and k_proj rows
    are reordered on the way (:func:`fptq.export.gguf.rope_rows_to_ggml`). ``qwen2`` uses NEOX RoPE,
    which is rotate-half: nothing to reorder."""

    name: str
    rope_permute: bool


_ARCHES = {
    "llama": GGUFArch("llama", True),
    "mistral": GGUFArch("llama", True),  # llama.cpp runs Mistral as llama (no sliding window: checked below)
    "qwen2": GGUFArch("qwen2", False),
}
_NOT_MAPPED = {
    "gemma": "its norms scale by 1 + weight and its embeddings by sqrt(hidden); fptq's GGUF writer does not map "
             "the gemma architecture",
    "gemma2": "fptq's GGUF writer does not map the gemma2 architecture (logit soft-capping, four norms a layer)",
    "gemma3_text": "fptq's GGUF writer does not map the gemma3 architecture (sliding-window layers, q/k norms)",
    "opt": "llama.cpp has no OPT architecture",
    "bloom": "fptq's GGUF writer does not map llama.cpp's bloom architecture (fused query_key_value, ALiBi)",
    "qwen3": "fptq's GGUF writer does not map the qwen3 architecture (q/k norms) yet",
}


def gguf_arch(cfg: dict[str, Any]) -> GGUFArch:
    """The llama.cpp architecture of a Hugging Face ``config.json`` (a dict), or FptqError naming why not."""
    model_type = cfg.get("model_type")
    alt = "; export it with --format compressed-tensors instead"
    if model_type in _NOT_MAPPED:
        raise FptqError(f"cannot export model type {model_type!r} to GGUF: {_NOT_MAPPED[model_type]}{alt}")
    if model_type not in _ARCHES:
        raise FptqError(f"cannot export model type {model_type!r} to GGUF: fptq's GGUF writer maps only "
                        f"{', '.join(sorted(_ARCHES))} to llama.cpp architectures{alt}")
    rope = _rope(cfg)
    if rope.get("rope_type", "default") not in ("default", "linear"):
        raise FptqError(f"cannot export to GGUF: RoPE scaling {rope.get('rope_type')!r} is not mapped by fptq's "
                        f"GGUF writer (only none and linear){alt}")
    if cfg.get("sliding_window") and (model_type == "mistral" or cfg.get("use_sliding_window")):
        raise FptqError(f"cannot export to GGUF: sliding-window attention (sliding_window={cfg['sliding_window']}) "
                        f"has no place in llama.cpp's {_ARCHES[model_type].name} architecture{alt}")
    return _ARCHES[model_type]


def _rope(cfg: dict[str, Any]) -> dict[str, Any]:
    """RoPE settings in transformers 5's ``rope_parameters`` form (older configs: rope_theta, rope_scaling)."""
    rope = dict(cfg.get("rope_parameters") or {})
    if not rope:
        scaling = cfg.get("rope_scaling") or {}
        rope = {"rope_theta": cfg.get("rope_theta", 10000.0),
                "rope_type": scaling.get("rope_type", scaling.get("type", "default")), **scaling}
    return rope


def head_dim(cfg: dict[str, Any]) -> int:
    return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


def find_source_gguf(ckpt: Path) -> Path | None:
    """The GGUF file the checkpoint's (or model directory's) float model was converted from, if any: the
    checkpoint's quantize report names the model (a ``.gguf`` argument, or a converted directory
    holding ``fptq_source.json``); a model directory holds ``fptq_source.json`` itself."""
    candidates: list[Path] = []
    report = ckpt / "quantize_report.json"
    if report.is_file():
        rep = json.loads(report.read_text())
        if str(rep.get("model_arg") or "").endswith(".gguf"):
            candidates.append(Path(rep["model_arg"]))
        if rep.get("source_model"):
            candidates.extend(_recorded(Path(rep["source_model"])))
    candidates.extend(_recorded(ckpt))
    return next((p for p in candidates if p.is_file()), None)


def _recorded(model_dir: Path) -> list[Path]:
    f = model_dir / SOURCE_NAME
    if not f.is_file():
        return []
    try:
        return [Path(json.loads(f.read_text())["gguf"])]
    except (json.JSONDecodeError, KeyError, TypeError):
        return []


# ------------------------------------------------------------------ copied from the source GGUF
def _field_value(field) -> tuple[Any, Any, Any]:
    """``(value, type, sub_type)`` of a GGUFReader field, strings kept as raw bytes."""
    from gguf import GGUFValueType

    main = field.types[0]
    if main == GGUFValueType.ARRAY:
        sub = field.types[-1]
        if len(field.types) != 2:
            raise FptqError(f"GGUF key {field.name}: nested arrays are not copied by fptq")
        if sub == GGUFValueType.STRING:
            return [bytes(field.parts[i]) for i in field.data], main, sub
        return list(field.contents()), main, sub
    if main == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]), main, None
    return field.contents(), main, None


def _check_source(reader, path: Path, arch: GGUFArch, cfg: dict[str, Any]) -> None:
    def get(key: str):
        f = reader.fields.get(key)
        return f.contents() if f is not None else None

    src_arch = get("general.architecture")
    want = {f"{arch.name}.block_count": cfg["num_hidden_layers"], f"{arch.name}.embedding_length": cfg["hidden_size"],
            f"{arch.name}.attention.head_count": cfg["num_attention_heads"]}
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    problems = [f"architecture {src_arch!r}, not {arch.name!r}"] if src_arch != arch.name else []
    problems += [f"{k} = {get(k)}, the checkpoint has {v}" for k, v in want.items() if get(k) != v]
    if tokens is None:
        problems.append("it has no tokenizer")
    elif len(tokens.data) != cfg["vocab_size"]:
        problems.append(f"its tokenizer has {len(tokens.data)} tokens, the checkpoint's vocabulary {cfg['vocab_size']}")
    if problems:
        raise FptqError(f"{path} does not describe this checkpoint's model ({'; '.join(problems)}); give the right "
                        "file with --gguf-metadata FILE.gguf, or --gguf-metadata hf to convert the checkpoint's "
                        "Hugging Face tokenizer")


def add_source_metadata(writer, path: Path, arch: GGUFArch, cfg: dict[str, Any]) -> dict[str, Any]:
    """Copy the model's keys of the GGUF file ``path`` into ``writer``; returns what was copied."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - any parse error means a damaged file
        raise FptqError(f"cannot read the metadata of {path} ({e}); give another file with --gguf-metadata, "
                        "or --gguf-metadata hf") from e
    _check_source(reader, path, arch, cfg)
    copied = []
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in _FILE_KEYS or key.startswith("split."):
            continue
        if not key.startswith(("general.", "tokenizer.", f"{arch.name}.")):
            continue
        value, vtype, sub = _field_value(field)
        writer.add_key_value(key, value, vtype, sub_type=sub)
        copied.append(key)
    return {"kind": "gguf", "path": str(path), "keys_copied": len(copied),
            "tokenizer_model": _text(reader, "tokenizer.ggml.model"), "tokenizer_pre": _text(reader, "tokenizer.ggml.pre"),
            "tokens": len(reader.fields["tokenizer.ggml.tokens"].data)}


def _text(reader, key: str) -> str | None:
    f = reader.fields.get(key)
    return f.contents() if f is not None else None


# ---------------------------------------------------------------- converted from Hugging Face files
def add_hyperparameters(writer, arch: GGUFArch, cfg: dict[str, Any]) -> None:
    """The ``<arch>.*`` keys llama.cpp reads for llama/qwen2, from ``config.json``."""
    from gguf import RopeScalingType

    n_head = cfg["num_attention_heads"]
    writer.add_context_length(int(cfg.get("max_position_embeddings") or 2048))
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(cfg.get("num_key_value_heads") or n_head)
    writer.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(cfg["vocab_size"])
    hd = head_dim(cfg)
    writer.add_rope_dimension_count(hd)
    if hd != cfg["hidden_size"] // n_head:
        writer.add_key_length(hd)
        writer.add_value_length(hd)
    rope = _rope(cfg)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))


# llama.cpp's name (``tokenizer.ggml.pre``) for the pre-tokenizers of tokenizer.json that fptq recognises
_GPT2_SPLIT = {"type": "ByteLevel", "use_regex": True}
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
                r"\s+(?!\S)|\s+")
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")


def bpe_pre_tokenizer(tokenizer_json: dict[str, Any]) -> str | None:
    """llama.cpp's ``tokenizer.ggml.pre`` for the pre-tokenizer of a byte-level BPE ``tokenizer.json``:
    ``gpt-2`` (ByteLevel with its own regex), ``smollm`` (single digits, then GPT-2's regex), ``qwen2`` and
    ``llama-bpe`` (LLaMA 3) by their split regex; ``None`` for anything else."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]

    def byte_level(p: dict, regex: bool) -> bool:
        return p.get("type") == "ByteLevel" and bool(p.get("use_regex", True)) == regex

    if len(parts) == 1 and byte_level(parts[0], True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and byte_level(parts[1], True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and byte_level(parts[1], False):
        regex = (parts[0].get("pattern") or {}).get("Regex")
        return {_QWEN2_REGEX: "qwen2", _LLAMA3_REGEX: "llama-bpe"}.get(regex)
    return None


def _vocab(tok_dir: Path):
    """The gguf package's vocabulary of a Hugging Face tokenizer directory: BpeVocab, else LlamaHfVocab."""
    from gguf.vocab import BpeVocab, LlamaHfVocab

    errors = []
    for cls in (BpeVocab, LlamaHfVocab):
        try:
            return cls(tok_dir)
        except (FileNotFoundError, TypeError, ValueError, KeyError) as e:
            errors.append(f"{cls.__name__}: {e}")
    raise FptqError(f"cannot convert the tokenizer in {tok_dir} to GGUF: it is neither GPT-2 style byte-level BPE nor "
                    f"LLaMA style BPE with byte fallback ({'; '.join(errors)}); give the model's GGUF file with "
                    "--gguf-metadata FILE.gguf")


def add_hf_tokenizer(writer, tok_dir: Path, vocab_size: int) -> dict[str, Any]:
    """``tokenizer.*`` keys converted from the tokenizer files in ``tok_dir`` (padded with unused tokens up
    to the model's ``vocab_size``, the rows of its embedding)."""
    from gguf import TokenType
    from gguf.vocab import SpecialVocab

    vocab = _vocab(tok_dir)
    tokens, scores, types = [], [], []
    for text, score, ttype in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(ttype)
    tj = json.loads((tok_dir / "tokenizer.json").read_text(encoding="utf-8"))
    for added in tj.get("added_tokens", []):  # special tokens inside the base vocabulary are control tokens
        i = added.get("id")
        if isinstance(i, int) and i < len(types):
            types[i] = TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED
    if len(tokens) > vocab_size:
        raise FptqError(f"the tokenizer in {tok_dir} has {len(tokens)} tokens, more than the model's vocabulary "
                        f"({vocab_size})")
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(TokenType.UNUSED)
    model = vocab.tokenizer_model
    writer.add_tokenizer_model(model)
    pre = bpe_pre_tokenizer(tj) if model == "gpt2" else None
    writer.add_tokenizer_pre(pre or "default")
    writer.add_token_list(tokens)
    if model == "llama":
        writer.add_token_scores(scores)
    writer.add_token_types([int(t) for t in types])
    SpecialVocab(tok_dir, load_merges=model == "gpt2", n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)
    return {"kind": "hf", "path": str(tok_dir), "tokenizer_model": model, "tokenizer_pre": pre or "default",
            "tokens": len(tokens), "padding_tokens": vocab_size - vocab.vocab_size,
            **({} if pre or model != "gpt2" else
               {"warning": "pre-tokenizer not recognised: written as 'default' (llama.cpp then splits text with "
                           "GPT-2's rules, which may tokenize differently from the Hugging Face tokenizer)"})}


def add_hf_metadata(writer, arch: GGUFArch, cfg: dict[str, Any], tok_dir: Path) -> dict[str, Any]:
    """Hyper-parameters from ``cfg`` and the tokenizer of ``tok_dir``; returns what was written."""
    name = cfg.get("_name_or_path") or tok_dir.name
    writer.add_type("model")
    writer.add_name(Path(str(name)).name)
    add_hyperparameters(writer, arch, cfg)
    return add_hf_tokenizer(writer, tok_dir, cfg["vocab_size"])
