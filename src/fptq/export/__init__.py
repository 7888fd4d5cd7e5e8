"""Export fptq checkpoints to formats other runtimes serve: ``fptq export OUT --format compressed-tensors -o DIR``."""
from __future__ import annotations

import json
from pathlib import Path

from .compressed_tensors import ACTIVATIONS, EXPORT_REPORT_NAME, export_compressed_tensors

FORMATS = ("compressed-tensors",)

__all__ = ["export", "export_compressed_tensors", "FORMATS", "EXPORT_REPORT_NAME", "register"]


def export(src: str | Path, out: str | Path, format: str = "compressed-tensors", **kw) -> Path:
    """Export the fptq checkpoint ``src`` to ``out`` in ``format`` (see :data:`FORMATS`)."""
    from ..errors import FptqError

    if format == "compressed-tensors":
        return export_compressed_tensors(src, out, **kw)
    raise FptqError(f"unknown export format {format!r}; supported: {', '.join(FORMATS)}")


def cmd_export(args) -> int:
    kw = {"max_shard_bytes": args.max_shard_size} if args.max_shard_size else {}
    out = export(args.checkpoint, args.out, args.format, activations=args.activations, force=args.force, **kw)
    rep = json.loads((out / EXPORT_REPORT_NAME).read_text())
    n_layers = len(rep["layers"])
    print(f"exported   {args.checkpoint} -> {out} ({args.format}, {rep['activations']})")
    print(f"layers     {n_layers} quantized, {len(rep['kept']['float_layers'])} kept in float (ignore list)")
    if args.activations == "int8":
        print(f"changed    {len(rep['layers_static_to_dynamic'])} static/LAE+static layers now quantize their "
              "input dynamically per token (vLLM's integer W4A8 path has no static scales)")
    else:
        print(f"changed    activation quantization dropped on {len(rep['layers_activation_quantization_dropped'])} "
              "layers (weight-only W4A16)")
    print("kept       int4 codes and fp16 group scales exactly; equalization folds exactly")
    print(f"report     {out / EXPORT_REPORT_NAME}")
    return 0


def register(sub) -> None:
    from ..cli import _size

    p = sub.add_parser("export", help="convert an fptq checkpoint for other runtimes (vLLM, transformers)",
                       description="Write an fptq checkpoint in the compressed-tensors format that vLLM and "
                                   "transformers load. With --activations int8 (W4A8) every quantized layer "
                                   "quantizes its input dynamically per token (vLLM's integer W4A8 path has no "
                                   "static scales); --activations none writes weight-only W4A16 (packed int4). "
                                   "The int4 codes and scales are kept exactly; see the export report.")
    p.add_argument("checkpoint", help="fptq output directory (from fptq quantize)")
    p.add_argument("--format", default="compressed-tensors", choices=FORMATS, help="output format (default: compressed-tensors)")
    p.add_argument("-o", "--out", required=True, help="output directory")
    p.add_argument("--activations", default="int8", choices=ACTIVATIONS,
                   help="int8: W4A8, int8 dynamic per-token activations (int-quantized); none: W4A16, "
                        "weights only (pack-quantized, the format vLLM serves on NVIDIA GPUs). Default int8")
    p.add_argument("--force", action="store_true", help="replace an existing non-empty output directory")
    p.add_argument("--max-shard-size", type=_size, default=None, help="largest weights file (default 2GiB)")
    p.set_defaults(func=cmd_export)
