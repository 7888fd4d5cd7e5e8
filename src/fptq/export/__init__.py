"""Export fptq checkpoints to formats other runtimes serve: ``fptq export OUT --format compressed-tensors -o DIR``
(vLLM, transformers) and ``fptq export OUT --format gguf -o MODEL.gguf`` (llama.cpp)."""
from __future__ import annotations

import json
from pathlib import Path

from .compressed_tensors import ACTIVATIONS, EXPORT_REPORT_NAME, export_compressed_tensors
from .gguf import EMBEDDING_TYPES, export_gguf, report_path

FORMATS = ("compressed-tensors", "gguf")

__all__ = ["export", "export_compressed_tensors", "export_gguf", "FORMATS", "EXPORT_REPORT_NAME", "register"]


def export(src: str | Path, out: str | Path, format: str = "compressed-tensors", **kw) -> Path:
    """Export the fptq checkpoint ``src`` to ``out`` in ``format`` (see :data:`FORMATS`): a directory for
    compressed-tensors (:func:`export_compressed_tensors`), one file for gguf (:func:`export_gguf`)."""
    from ..errors import FptqError

    if format == "compressed-tensors":
        return export_compressed_tensors(src, out, **kw)
    if format == "gguf":
        return export_gguf(src, out, **kw)
    raise FptqError(f"unknown export format {format!r}; supported: {', '.join(FORMATS)}")


def _print_compressed_tensors(args, out: Path) -> None:
    rep = json.loads((out / EXPORT_REPORT_NAME).read_text())
    n_layers = len(rep["layers"])
    print(f"exported   {args.checkpoint} -> {out} ({args.format}, {rep['activations']})")
    print(f"layers     {n_layers} quantized, {len(rep['kept']['float_layers'])} kept in float (ignore list)")
    if rep["activations"].startswith("int8"):
        print(f"changed    {len(rep['layers_static_to_dynamic'])} static/LAE+static layers now quantize their "
              "input dynamically per token (vLLM's integer W4A8 path has no static scales)")
    else:
        print(f"changed    activation quantization dropped on {len(rep['layers_activation_quantization_dropped'])} "
              "layers (weight-only W4A16)")
    print("kept       int4 codes and fp16 group scales exactly; equalization folds exactly")
    print(f"report     {out / EXPORT_REPORT_NAME}")


def _print_gguf(args, out: Path) -> None:
    rep = json.loads(report_path(out).read_text())
    sizes = rep["sizes"]
    types = ", ".join(f"{t} {v['tensors']} ({v['bytes'] / 1e6:.1f} MB)" for t, v in sizes["by_type"].items())
    groups = sorted({lay["group_size"] for lay in rep["layers"].values()})
    meta = rep["metadata"]
    print(f"exported   {args.checkpoint} -> {out} (gguf, {rep['architecture']}, {len(rep['layers'])} Linears as Q4_0)")
    print(f"tensors    {types}")
    print(f"size       {sizes['file_bytes'] / 1e6:.1f} MB, {sizes['bits_per_weight']['file']:.2f} bits per weight "
          f"(Q4_0 tensors {sizes['bits_per_weight']['q4_0_tensors']:.2f}); embeddings {rep['embeddings']}, "
          f"output {rep['output']}")
    print(f"metadata   {'copied from ' + meta['path'] if meta['kind'] == 'gguf' else 'converted from the Hugging Face tokenizer'}"
          f" (tokenizer {meta['tokenizer_model']}/{meta['tokenizer_pre']}, {meta['tokens']} tokens)")
    print(f"kept       int4 codes and fp16 group scales exactly (group size {', '.join(map(str, groups))}: "
          "one scale per 32-weight Q4_0 block, repeated within a group); equalization folded into the norms")
    print(f"dropped    {rep['lost']['static_activation_scales']}; llama.cpp quantizes every Q4_0 input to Q8_0 "
          "on the fly")
    if meta.get("warning"):
        print(f"warning    {meta['warning']}")
    print(f"report     {report_path(out)}")


def cmd_export(args) -> int:
    from ..errors import FptqError

    if args.format == "gguf":
        if args.activations or args.max_shard_size:
            raise FptqError("--activations and --max-shard-size apply to --format compressed-tensors; llama.cpp "
                            "quantizes activations itself (Q8_0) and a GGUF export is one file")
        out = export(args.checkpoint, args.out, "gguf", embeddings=args.gguf_embeddings or "f16",
                     output=args.gguf_output, metadata=args.gguf_metadata, force=args.force)
        _print_gguf(args, out)
        return 0
    if args.gguf_embeddings or args.gguf_output or args.gguf_metadata:
        raise FptqError("--gguf-embeddings, --gguf-output and --gguf-metadata apply to --format gguf")
    kw = {"max_shard_bytes": args.max_shard_size} if args.max_shard_size else {}
    out = export(args.checkpoint, args.out, args.format, activations=args.activations or "int8", force=args.force,
                 **kw)
    _print_compressed_tensors(args, out)
    return 0


def register(sub) -> None:
    from ..cli import _size

    p = sub.add_parser("export", help="convert an fptq checkpoint for other runtimes (vLLM, transformers, llama.cpp)",
                       description="Write an fptq checkpoint in the compressed-tensors format that vLLM and "
                                   "transformers load, or as one GGUF file for llama.cpp. compressed-tensors: with "
                                   "--activations int8 (W4A8) every quantized layer quantizes its input dynamically "
                                   "per token (vLLM's integer W4A8 path has no static scales); --activations none "
                                   "writes weight-only W4A16 (packed int4). gguf: the quantized Linears become Q4_0 "
                                   "(group sizes that are multiples of 32; llama.cpp quantizes activations to Q8_0 "
                                   "itself). The int4 codes and scales are kept exactly; see the export report.")
    p.add_argument("checkpoint", help="fptq output directory (from fptq quantize)")
    p.add_argument("--format", default="compressed-tensors", choices=FORMATS, help="output format (default: compressed-tensors)")
    p.add_argument("-o", "--out", required=True, help="output directory (compressed-tensors) or .gguf file (gguf)")
    p.add_argument("--activations", default=None, choices=ACTIVATIONS,
                   help="compressed-tensors only. int8: W4A8, int8 dynamic per-token activations (int-quantized); "
                        "none: W4A16, weights only (pack-quantized, the format vLLM serves on NVIDIA GPUs). Default int8")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.add_argument("--max-shard-size", type=_size, default=None, help="largest weights file (default 2GiB; compressed-tensors)")
    p.add_argument("--gguf-embeddings", default=None, choices=EMBEDDING_TYPES,
                   help="gguf only: type of the token embeddings (default f16; bf16 keeps a bfloat16 checkpoint's "
                        "values exactly; q8_0 / q4_0 quantized as llama.cpp's presets do)")
    p.add_argument("--gguf-output", default=None, choices=EMBEDDING_TYPES,
                   help="gguf only: type of an untied lm_head (default: as --gguf-embeddings; a tied one is the "
                        "embeddings)")
    p.add_argument("--gguf-metadata", default=None, metavar="FILE.gguf|hf",
                   help="gguf only: copy the metadata and tokenizer from this GGUF file ('hf': convert the "
                        "checkpoint's Hugging Face tokenizer). Default: the GGUF file the model was converted "
                        "from, when fptq knows it, else 'hf'")
    p.set_defaults(func=cmd_export)
