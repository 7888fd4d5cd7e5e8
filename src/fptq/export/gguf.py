"""Export an fptq checkpoint to one GGUF file, the format llama.cpp (and ollama, LM Studio,
llama-cpp-python) runs: ``fptq export OUT --format gguf -o MODEL.gguf``.

What is written:

* every quantized Linear as ``Q4_0``, its int4 codes and float16 group scales copied bit for bit
  (:func:`fptq.quant.pack.pack_q4_0`: ``q = code + 8``, block scale ``d`` = the group's scale, so
  ``d * (q - 8) == scale * code``). A ``Q4_0`` block is 32 weights of a row: group sizes 32, 64, 128, ...
  (any multiple of 32, a ragged last group included) and per-channel scales are exact by repeating the
  group's scale in each of its blocks. Anything else (group 16, a row length that is not a multiple of
  32, 8-bit weights) is refused, naming ``--group-size 32``: nothing is rounded a second time;
* norms (with the LAE / SmoothQuant scales fptq folded into them) and biases as ``F32``; embeddings and
  an untied ``lm_head`` as ``F16`` (``embeddings`` / ``output``: ``bf16``, ``f32``, ``q8_0`` or ``q4_0`` on
  request, quantized by the gguf package as llama.cpp quantizes them; it has no ``Q6_K`` quantizer, so
  llama.cpp's ``Q6_K`` preset for the output is not offered); Linears the plan keeps in float as ``F16``;
* LLaMA's q_proj / k_proj rows (codes, scales and biases alike) reordered from Hugging Face's rotate-half
  layout to GGML's RoPE layout (:func:`rope_rows_to_ggml`); Qwen2 (NEOX RoPE) keeps them as they are;
* metadata and tokenizer from the GGUF file the model came from, or converted from the Hugging Face
  tokenizer files (:mod:`fptq.export.gguf_meta`), ``general.file_type`` = ``MOSTLY_Q4_0`` and ``fptq.*``
  provenance keys.

The checkpoint must be a plain float-activation model once its activation quantizers are removed:
equalization is folded into norms and producer Linears before quantization, and a quantized Linear
holds only ``qweight``, ``w_scales``, ``act_scale`` and ``bias`` (no runtime input transform); any other
tensor of a quantized Linear is refused. fptq's activation quantization is not written: llama.cpp
quantizes the input of every ``Q4_0`` matrix product itself (``Q8_0``: int8 with one scale per 32
values); the static activation scales are dropped (listed in the report).

The file is written into a temporary sibling folder and renamed into place; the JSON report
(:func:`report_path`: ``MODEL.gguf.json``) lists every tensor's source, the sizes and what was dropped. The
tensors and the checks are in :mod:`fptq.export.gguf_tensors`, metadata and tokenizer in
:mod:`fptq.export.gguf_meta`.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import FptqError
from ..io import (
    PLAN_NAME,
    check_is_checkpoint,
    check_output_file,
    file_sha256,
    read_plan,
    read_quantization_config,
    staging_dir,
    verify_files,
    weight_files,
)
from ..plan import LayerPlan, Plan
from ..quant.pack import Q4_0_BLOCK
from ..st import WeightIndex
from ..stored_head import CheckpointIndex
from .gguf_meta import GGUFArch, add_hf_metadata, add_source_metadata, find_source_gguf, gguf_arch
from .gguf_tensors import (
    EMBEDDING_TYPES,
    FLOAT_TYPES,
    GGUFTensor,
    check_folds,
    check_layers,
    gguf_tensors,
    rope_rows_to_ggml,
)

__all__ = ["export_gguf", "export_float_gguf", "rope_rows_to_ggml", "report_path", "EMBEDDING_TYPES", "FLOAT_TYPES"]


def report_path(out: str | Path) -> Path:
    """The JSON report written beside a GGUF file: ``MODEL.gguf`` -> ``MODEL.gguf.json``."""
    out = Path(out)
    return out.with_name(out.name + ".json")




def _write(path: Path, arch: GGUFArch, tensors: list[GGUFTensor], add_metadata: Callable[[Any], dict],
           file_type: int, extra: dict[str, Any], progress: bool) -> dict[str, Any]:
    """Write the GGUF file: metadata, tensor infos, then each tensor's data as it is computed."""
    from gguf import GGML_QUANT_VERSION, GGMLQuantizationType, GGUFWriter

    writer = GGUFWriter(str(path), arch.name)
    try:
        meta = add_metadata(writer)
        writer.add_file_type(file_type)
        writer.add_quantization_version(GGML_QUANT_VERSION)
        for key, value in extra.items():
            if isinstance(value, int):
                writer.add_int32(key, value)
            else:
                writer.add_string(key, str(value))
        for t in tensors:
            plain = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}.get(t.qtype)
            if plain is not None:
                writer.add_tensor_info(t.name, t.shape, np.dtype(plain), t.nbytes)
            else:
                from gguf.quants import quant_shape_to_byte_shape

                writer.add_tensor_info(t.name, quant_shape_to_byte_shape(t.shape, t.qtype), np.dtype(np.uint8),
                                       t.nbytes, raw_dtype=t.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(t.nbytes for t in tensors), unit="B", unit_scale=True, desc=f"writing {path.name}",
                   disable=not progress, leave=False)
        for t in tensors:
            data = t.make()
            if data.nbytes != t.nbytes:  # pragma: no cover - guards the header written before the data
                raise FptqError(f"internal error: {t.name} has {data.nbytes} bytes, its header says {t.nbytes}")
            writer.write_tensor_data(data)
            bar.update(t.nbytes)
        bar.close()
    finally:
        writer.close()
    return meta


def _metadata_writer(metadata: str | Path | None, ckpt: Path, arch: GGUFArch, cfg: dict[str, Any]):
    """``add_metadata(writer) -> info``: from ``metadata`` (a GGUF path), the source GGUF found for
    ``ckpt`` (``None`` / ``"auto"``), or the Hugging Face files of ``ckpt`` (``"hf"``)."""
    if metadata in (None, "auto"):
        source = find_source_gguf(ckpt)
    elif str(metadata) == "hf":
        source = None
    else:
        source = Path(metadata)
        if not source.is_file():
            raise FptqError(f"--gguf-metadata {metadata}: file not found (give the model's .gguf file, or 'hf')")
    if source is not None:
        return lambda w: add_source_metadata(w, source, arch, cfg)
    if not (ckpt / "tokenizer.json").is_file():
        raise FptqError(f"{ckpt} has no tokenizer.json and no source GGUF file is known: give the model's GGUF "
                        "file with --gguf-metadata FILE.gguf")
    return lambda w: add_hf_metadata(w, arch, cfg, ckpt)


def _sizes(tensors: list[GGUFTensor], file_bytes: int) -> dict[str, Any]:
    by_type: dict[str, dict[str, int]] = {}
    for t in tensors:
        row = by_type.setdefault(t.qtype.name, {"tensors": 0, "elements": 0, "bytes": 0})
        row["tensors"] += 1
        row["elements"] += t.elements
        row["bytes"] += t.nbytes
    elements = sum(t.elements for t in tensors)
    q = by_type.get("Q4_0")
    return {"file_bytes": file_bytes, "elements": elements, "by_type": by_type,
            "bits_per_weight": {"file": 8 * file_bytes / elements,
                                **({"q4_0_tensors": 8 * q["bytes"] / q["elements"]} if q else {})}}


def _f16_changes(index: WeightIndex, tensors: list[GGUFTensor]) -> dict[str, Any]:
    """For each float tensor written as F16: how many of its stored values float16 cannot hold exactly
    (a bfloat16 checkpoint's values below float16's normal range lose bits)."""
    from gguf import GGMLQuantizationType

    out = {}
    for t in tensors:
        if t.qtype == GGMLQuantizationType.F16:
            v = index.entries([t.source])[0].read().float()
            changed = v.to(torch.float16).float() != v
            out[t.name] = {"values_changed": int(changed.sum()), "of": v.numel(),
                           "max_abs_change": float((v.to(torch.float16).float() - v).abs().max()) if v.numel() else 0.0}
    return out


def _finish(tmp: Path, path: Path, out: Path, report: dict[str, Any]) -> None:
    """Record the file's size and sha256, write the report, rename both into place."""
    report["files"] = {out.name: {"bytes": path.stat().st_size, "sha256": file_sha256(path)}}
    rp = tmp / report_path(path).name
    rp.write_text(json.dumps(report, indent=2, default=str))
    os.replace(path, out)
    os.replace(rp, report_path(out))
    tmp.rmdir()


def export_gguf(src: str | Path, out: str | Path, *, embeddings: str = "f16", output: str | None = None,
                metadata: str | Path | None = None, force: bool = False, progress: bool = True) -> Path:
    """Write the fptq checkpoint ``src`` as the GGUF file ``out`` (see the module docstring). ``embeddings``:
    the type of ``token_embd`` (:data:`EMBEDDING_TYPES`), ``output`` that of an untied ``lm_head`` (default: the
    same); ``metadata``: where the metadata and
    tokenizer come from (``None``: the GGUF file the model came from when fptq knows it, else the checkpoint's
    Hugging Face tokenizer; a ``.gguf`` path; or ``"hf"``). An existing ``out`` is refused unless ``force``;
    the file appears whole or not at all. Returns ``out``; :func:`report_path` (``out`` + ``.json``) says what
    was kept and dropped."""
    from gguf import LlamaFileType

    from .. import __version__

    src, out = Path(src), Path(out)
    check_is_checkpoint(src)
    output = output or embeddings
    for what, kind in (("embeddings", embeddings), ("output", output)):
        if kind not in EMBEDDING_TYPES:
            raise FptqError(f"{what} must be one of {', '.join(EMBEDDING_TYPES)}, got {kind!r}")
    verify_files(src)
    plan = read_plan(src / PLAN_NAME)
    cfg, qcfg = read_quantization_config(src)
    arch = gguf_arch(cfg)
    quantized = check_layers(plan)
    index = CheckpointIndex(src, qcfg)  # a head stored as the embedding times a transform: computed
    cfg = index.config(cfg)
    folded = check_folds(plan, index)
    tensors = gguf_tensors(index, cfg, arch, quantized, embeddings, output, "f16")
    add_metadata = _metadata_writer(metadata, src, arch, cfg)
    out = check_output_file(out, force)
    extra = {"general.quantized_by": f"fptq {__version__}", "fptq.version": __version__,
             "fptq.method": str(qcfg.get("method")), "fptq.group_size": int(qcfg.get("group_size") or 0),
             "fptq.weights": "int4 codes and float16 group scales of the checkpoint, copied into Q4_0 exactly"}
    with staging_dir(out) as tmp:
        path = tmp / out.name
        meta = _write(path, arch, tensors, add_metadata, int(LlamaFileType.MOSTLY_Q4_0), extra, progress)
        report = _report(plan, src, qcfg, arch, meta, tensors, quantized, folded, path.stat().st_size)
        report["f16_conversion"] = _f16_changes(index, tensors)
        _finish(tmp, path, out, report)
    return out


def _report(plan: Plan, src: Path, qcfg: dict[str, Any], arch: GGUFArch, meta: dict[str, Any],
            tensors: list[GGUFTensor], quantized: dict[str, LayerPlan], folded: list[str],
            file_bytes: int) -> dict[str, Any]:
    static = {n: lp.act_scale for n, lp in plan.layers.items()
              if n in quantized and lp.strategy in ("static_tensor", "lae_static_tensor")}
    by_source = {t.source: t for t in tensors}
    layers = {}
    for n, lp in quantized.items():
        gs = lp.group_size
        blocks = (gs if gs > 0 else lp.in_features) // Q4_0_BLOCK
        layers[n] = {"gguf": by_source[f"{n}.weight"].name, "type": "Q4_0", "group_size": gs,
                     "blocks_per_group": blocks, "fptq_strategy": lp.strategy,
                     **({"dropped_static_act_scale": lp.act_scale} if n in static else {})}
    return {
        "format": "gguf",
        "architecture": arch.name,
        "rope_rows_reordered": ["q_proj", "k_proj"] if arch.rope_permute else [],
        "source": str(src),
        "source_method": qcfg.get("method"),
        "source_weights_sha256": {n: file_sha256(src / n) for n in weight_files(src)},
        "metadata": meta,
        "embeddings": next(t.qtype.name for t in tensors if t.name == "token_embd.weight"),
        "output": next((t.qtype.name for t in tensors if t.name == "output.weight"), "tied to token_embd"),
        "sizes": _sizes(tensors, file_bytes),
        "kept": {
            "weights": "exact: each int4 code c is written as q = c + 8 and each float16 group scale as the Q4_0 "
                       "block scale d (repeated in every block of a group longer than 32), so d * (q - 8) equals "
                       "fptq's scale * code bit for bit",
            "equalization": "exact: LAE/SmoothQuant scales are folded into the norms (written as F32) and the "
                            "producer Linears' weights before quantization",
            "layers_with_folded_equalization": folded,
        },
        "lost": {
            "activation_quantization": "llama.cpp quantizes the input of every Q4_0 matrix product itself, to Q8_0 "
                                       "(int8 with one float16 scale per 32 values), whatever fptq's plan chose "
                                       "(static per tensor, LAE + static, dynamic per token, or float)",
            "static_activation_scales": f"{len(static)} layers quantized their input with a static per-tensor "
                                        "scale in fptq; the scales are dropped",
            "fptq_plan": "not in the file; the checkpoint keeps it",
        },
        "tensors": {t.name: {"source": t.source, "type": t.qtype.name, "shape": list(t.shape)} for t in tensors},
        "layers": layers,
    }


def export_float_gguf(model_dir: str | Path, out: str | Path, *, dtype: str = "f16", metadata: str | Path | None = None,
                      force: bool = False, progress: bool = True) -> Path:
    """Write the float Hugging Face model in ``model_dir`` (``config.json`` + safetensors) as a GGUF file
    with every matrix in ``dtype`` (:data:`FLOAT_TYPES`) and the norms in F32: llama.cpp's float reference
    (``convert_hf_to_gguf --outtype f16`` makes the same kind of file). Metadata as :func:`export_gguf`."""
    from gguf import LlamaFileType

    from .. import __version__

    model_dir, out = Path(model_dir), Path(out)
    if dtype not in FLOAT_TYPES:
        raise FptqError(f"dtype must be one of {', '.join(FLOAT_TYPES)}, got {dtype!r}")
    if not (model_dir / "config.json").is_file() or not WeightIndex.available(model_dir):
        raise FptqError(f"{model_dir} is not a Hugging Face model directory with safetensors weights")
    cfg = json.loads((model_dir / "config.json").read_text())
    if cfg.get("quantization_config"):
        raise FptqError(f"{model_dir} is a quantized checkpoint; export_float_gguf writes float models")
    arch = gguf_arch(cfg)
    index = WeightIndex(model_dir)
    tensors = gguf_tensors(index, cfg, arch, {}, dtype, dtype, dtype)
    add_metadata = _metadata_writer(metadata, model_dir, arch, cfg)
    out = check_output_file(out, force)
    file_type = {"f16": LlamaFileType.MOSTLY_F16, "bf16": LlamaFileType.MOSTLY_BF16, "f32": LlamaFileType.ALL_F32}[dtype]
    with staging_dir(out) as tmp:
        path = tmp / out.name
        meta = _write(path, arch, tensors, add_metadata, int(file_type), {"general.quantized_by": f"fptq {__version__}"},
                      progress)
        report = {"format": "gguf", "architecture": arch.name, "source": str(model_dir), "metadata": meta,
                  "dtype": dtype.upper(), "sizes": _sizes(tensors, path.stat().st_size),
                  "tensors": {t.name: {"source": t.source, "type": t.qtype.name, "shape": list(t.shape)}
                              for t in tensors}}
        _finish(tmp, path, out, report)
    return out
