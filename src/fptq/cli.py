"""Command line: ``fptq quantize | eval | inspect`` (and the commands other modules add:
``compare``, ``generate``, ``bench``, ``export``)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .errors import FptqError

log = logging.getLogger("fptq")


def _thresholds(s: str) -> tuple[float, float]:
    try:
        parts = [float(x) for x in s.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two numbers like 15,150, got {s!r}") from None
    if len(parts) != 2 or not (0 < parts[0] <= parts[1]):
        raise argparse.ArgumentTypeError(f"expected two positive numbers t0<=t1 like 15,150, got {s!r}")
    return parts[0], parts[1]


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def _size(s: str) -> int:
    """Bytes from ``500MB``, ``2GB``, ``1.5GiB`` or a plain number."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = s.strip().upper()
    num = t.rstrip("KMGIB")
    try:
        v = int(float(num) * units[t[len(num):]])
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"expected a size like 500MB or 2GB, got {s!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive size like 500MB or 2GB, got {s!r}")
    return v


def _ppl_spec(s: str) -> tuple[str, str]:
    if "=" not in s:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH (e.g. wikitext2=data/wikitext2_test.raw), got {s!r}")
    name, path = s.split("=", 1)
    return name, path


def add_quantize_args(p: argparse.ArgumentParser) -> None:
    from .methods import METHODS
    from .quant.static_scale import OBSERVERS

    p.add_argument("model", nargs="?", default=None,
                   help="Hugging Face model directory, .gguf file or hub id (default: SmolLM2-135M-Instruct)")
    p.add_argument("-o", "--out", required=True, help="output directory for the quantized checkpoint")
    p.add_argument("--method", default="fptq", choices=METHODS, help="quantization method (default: fptq)")
    p.add_argument("--wbits", type=int, default=None, help="weight bits (default 4; 8 for smoothquant-w8a8)")
    p.add_argument("--abits", type=int, default=None, help="activation bits (default 8)")
    p.add_argument("--group-size", type=int, default=None,
                   help="weights per scale along the input dimension (default 128; -1 = per output channel); "
                        "a last group shorter than this is allowed")
    p.add_argument("--calib", default=None, help="calibration text: .txt or .jsonl with a 'text' field (default: bundled C4 sample)")
    p.add_argument("--nsamples", type=_positive_int, default=128, help="calibration windows (default 128)")
    p.add_argument("--seqlen", type=_positive_int, default=2048, help="tokens per calibration window (default 2048)")
    p.add_argument("--seed", type=int, default=0, help="seed for window sampling (default 0)")
    p.add_argument("--thresholds", type=_thresholds, default=None,
                   help="max|x| thresholds t0,t1: static below t0, LAE+static below t1, dynamic above (default 15,150)")
    p.add_argument("--gptq", action="store_true", default=None, help="quantize weights with GPTQ instead of round-to-nearest")
    p.add_argument("--gptq-damp", type=float, default=None, help="GPTQ dampening, fraction of mean diag(H) (default 0.01)")
    p.add_argument("--gptq-block-size", type=int, default=None, help="GPTQ block size (default 128)")
    p.add_argument("--gptq-act-order", action="store_true", default=None, help="GPTQ: process columns by decreasing Hessian diagonal")
    p.add_argument("--gptq-static-groups", action="store_true", default=None, help="GPTQ: group scales from the original weights")
    p.add_argument("--observer", dest="static_observer", default=None, choices=OBSERVERS,
                   help="how static activation scales are chosen (default: mse)")
    p.add_argument("--weight-clip", dest="weight_clip_search", action="store_true", default=None,
                   help="search a per-group weight clip minimising the weight's quantization error")
    p.add_argument("--equalization", default=None, choices=("lae", "smoothquant", "none"),
                   help="equalization used by the method (fptq ablations: none, smoothquant)")
    p.add_argument("--lae-scope", dest="lae_scope", default=None, choices=("band", "all"),
                   help="fptq: equalize only the LAE band (band) or every static layer too (all)")
    p.add_argument("--equalize-into", dest="equalize_into", default=None, choices=("all", "norms"),
                   help="producers that take equalization scales: all (norms and Linears; default for fptq) or "
                        "norms (a Linear-fed layer in the LAE band then runs dynamic per-token)")
    p.add_argument("--alpha", dest="smoothquant_alpha", type=float, default=None, help="SmoothQuant migration strength (default 0.5)")
    p.add_argument("--calib-dtype", dest="calib_dtype", default=None, choices=("float32", "bfloat16"),
                   help="dtype of the statistics pass (bfloat16: autocast, faster on CPUs with AMX; default float32)")
    p.add_argument("--propagate-backend", dest="propagate_backend", default=None,
                   help="how the quantized layer is run to feed the next layer: reference (simulated, default) or auto (integer kernels, faster)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N: where each layer runs (default: cuda if available)")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="calibration windows per forward (default 8)")
    p.add_argument("--offload", nargs="?", const="cpu", default=False, metavar="DEVICE",
                   help="keep the cached calibration activations on DEVICE (default cpu; or another GPU, e.g. cuda:1) "
                        "while each layer runs on --device")
    p.add_argument("--low-memory", action="store_true",
                   help="lower peak resident memory: large blocks always go back to the OS (slower: a page fault per large allocation)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing non-empty output directory, or start over an unfinished run")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run of the same command after its last finished layer")
    p.add_argument("--max-shard-size", type=_size, default=None,
                   help="largest weights file of the checkpoint (default 2GiB; larger models get "
                        "model-0000i-of-0000n.safetensors shards)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow models that need custom code")


def config_from_args(args) -> "QuantConfig":
    from .methods import method_config

    overrides = {k: getattr(args, k, None) for k in (
        "wbits", "abits", "group_size", "thresholds", "gptq", "gptq_damp", "gptq_block_size", "gptq_act_order",
        "gptq_static_groups", "static_observer", "weight_clip_search", "equalization", "smoothquant_alpha",
        "equalize_into", "lae_scope", "calib_dtype", "propagate_backend")}
    try:
        return method_config(args.method, **overrides)
    except (ValueError, TypeError) as e:
        raise FptqError(str(e)) from e


def cmd_quantize(args) -> int:
    from .memory import return_freed_memory_to_os
    from .report import quantize_summary
    from .workflow import quantize_to_dir

    if args.low_memory:
        return_freed_memory_to_os()  # lower peak resident memory, slower (see fptq.memory)
    config = config_from_args(args)
    plan, report = quantize_to_dir(
        args.model, args.out, config, calib=args.calib, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
        device=args.device, batch_size=args.batch_size, offload=args.offload, force=args.force,
        trust_remote_code=args.trust_remote_code, resume=args.resume,
        **({"max_shard_size": args.max_shard_size} if args.max_shard_size else {}),
    )
    print(quantize_summary(plan, report))
    print(f"report     {Path(args.out) / 'quantize_report.json'}")
    return 0


def cmd_eval(args) -> int:
    from .eval.perplexity import evaluate_perplexity, load_eval_text, token_windows
    from .workflow import load_any, versions

    if not args.ppl:
        raise FptqError("nothing to evaluate: give at least one --ppl NAME=PATH (e.g. --ppl wikitext2=wikitext2_test.raw)")
    for name, path in args.ppl:
        if not Path(path).is_file():
            raise FptqError(f"--ppl {name}: file not found: {path}")
    model, tok, kind = load_any(args.model, device=args.device or "cpu", backend=args.backend)
    reference = None
    if args.reference is not None or args.kld:
        reference, _, _ = load_any(args.reference if args.reference != "default" else None, device=args.device or "cpu")
    results = {"model": args.model or "default", "kind": kind, "seqlen": args.seqlen,
               "max_windows": args.max_windows, "ppl": {}, "details": {}, "versions": versions()}
    for name, path in args.ppl:
        text = load_eval_text(path)
        windows = token_windows(tok, text, args.seqlen, args.max_windows)
        r = evaluate_perplexity(model, windows, reference=reference, device=args.device or "cpu", desc=name)
        results["ppl"][name] = r["ppl"]
        results["details"][name] = {**r, "path": str(path)}
        extra = f"  KLD {r['kld']:.4f}  top-1 {100 * r['top1']:.2f}%" if "kld" in r else ""
        print(f"{name:12s} ppl {r['ppl']:.3f}  ({r['windows']} windows x {args.seqlen} tokens){extra}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    return 0


def cmd_inspect(args) -> int:
    from .plan import Plan
    from .report import plan_chart, plan_table, strategy_table

    out = Path(args.out)
    plan_path = out / "fptq_plan.json" if out.is_dir() else out
    if not plan_path.is_file():
        raise FptqError(f"{out} is not an fptq checkpoint (no fptq_plan.json)")
    try:
        plan = Plan.load(plan_path)
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise FptqError(f"{plan_path} is not a valid fptq plan: {e}") from e
    print(plan_table(plan))
    print()
    print(strategy_table(plan))
    png = Path(args.png) if args.png else (out if out.is_dir() else out.parent) / "fptq_plan.png"
    plan_chart(plan, png)
    print(f"\nchart: {png}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="fptq", description="FPTQ W4A8 post-training quantization of causal language models.")
    parser.add_argument("--version", action="version", version=f"fptq {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    q = sub.add_parser("quantize", help="quantize a model and save a checkpoint",
                       description="Calibrate layer by layer, choose each Linear's activation strategy, "
                                   "fold equalization, quantize weights, save a checkpoint.")
    add_quantize_args(q)
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("eval", help="perplexity of a float model or an fptq checkpoint",
                       description="Perplexity over non-overlapping windows (GPTQ convention). "
                                   ".raw/.txt files: lines joined with blank lines; .jsonl: first 1000 'text' fields joined with spaces.")
    e.add_argument("model", nargs="?", default=None, help="model directory/.gguf/hub id or fptq output directory (default: the default model)")
    e.add_argument("--ppl", action="append", type=_ppl_spec, default=[], metavar="NAME=PATH", help="evaluation text (repeatable)")
    e.add_argument("--seqlen", type=_positive_int, default=2048, help="window length (default 2048)")
    e.add_argument("--max-windows", type=_positive_int, default=None, help="evaluate only the first N windows")
    e.add_argument("--json", default=None, help="write results to this JSON file")
    e.add_argument("--reference", default=None, help="reference model for KL divergence and top-1 agreement ('default' = default float model)")
    e.add_argument("--kld", action="store_true", help="compare against the default float model (same as --reference default)")
    e.add_argument("--backend", default="reference", help="quantized Linear backend: reference (simulated) or a kernel name (see fptq bench)")
    e.add_argument("--device", default=None, help="cpu or cuda")
    e.set_defaults(func=cmd_eval)

    i = sub.add_parser("inspect", help="print the plan of a checkpoint and chart max|x| per layer")
    i.add_argument("out", help="fptq output directory")
    i.add_argument("--png", default=None, help="chart path (default: OUT/fptq_plan.png)")
    i.set_defaults(func=cmd_inspect)

    for register in _extra_commands():
        register(sub)
    return parser


def _extra_commands():
    """Sub-commands that live in other modules (each exposes ``register(subparsers)``)."""
    import importlib

    out = []
    for mod in ("fptq.compare", "fptq.generate", "fptq.bench", "fptq.export"):
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name == mod:
                continue
            raise
        out.append(m.register)
    return out


def _resume_hint(argv: list[str], e) -> str:
    """What to print when a quantize run is interrupted between layers."""
    import shlex

    cmd = list(argv) if "--resume" in argv else [*argv, "--resume"]
    return (f"fptq: interrupted after {e.layers_done} of {e.layers_total} layers; nothing was written to {e.out}. "
            f"The finished layers are kept in {e.partial}; continue with:\n  fptq {shlex.join(cmd)}")


def main(argv: list[str] | None = None) -> int:
    from .resume import QuantizeInterrupted

    parser = build_parser()
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except FptqError as e:
        print(f"fptq: error: {e}", file=sys.stderr)
        return 2
    except QuantizeInterrupted as e:
        print(_resume_hint(argv, e), file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("fptq: interrupted; nothing was written to the output directory", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
