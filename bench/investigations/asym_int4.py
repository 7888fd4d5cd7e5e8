"""How much do symmetric int4 weights cost? Round-to-nearest weights of every decoder Linear, symmetric (fptq's
grid: ``absmax / 7.5``, float16 scale per group) against asymmetric (a float16 step and offset per group,
llama.cpp's ``Q4_1`` form, :mod:`fptq.quant.asymmetric`), each with and without a clip search on the weights'
error, activations left in float (the weights alone), on the evaluator and windows of
``bench/accuracy_sweep.py`` (perplexity, KL divergence and top-1 agreement against the float model)::

    python bench/investigations/asym_int4.py --groups 32,64 --wiki 8 --c4 8 --name asym_int4_smollm2
    python bench/investigations/asym_int4.py --model "$(../shared/tools/get-qwen2.5-coder-0.5b)" \\
        --groups 32,128 --wiki 4 --c4 4 --name asym_int4_qwen

The bytes per weight differ: a group of ``g`` 4-bit codes carries 16 bits of scale (symmetric) or 32 bits of step
and offset (asymmetric): 4.5 / 5.0 bits per weight at g = 32, 4.25 / 4.5 at g = 64, 4.125 / 4.25 at g = 128.
Writes bench/results/NAME.{json,md}.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import fptq  # noqa: E402
from fptq.models.loading import default_gguf_path  # noqa: E402
from fptq.quant.asymmetric import fake_quantize_asymmetric  # noqa: E402
from fptq.quant.weights import fake_quantize_weight  # noqa: E402

from _evalset import build_reference, evaluate_all, load_reference  # noqa: E402
from accuracy_sweep import eval_windows, reference_dir  # noqa: E402
from common import machine, write_results  # noqa: E402

GRIDS = {
    "symmetric": lambda w, g: fake_quantize_weight(w, 4, g),
    "symmetric + clip": lambda w, g: fake_quantize_weight(w, 4, g, clip_search=True),
    "symmetric, signed extreme (Q4_0's rule)": lambda w, g: fake_quantize_weight(w, 4, g, sign="signed"),
    "asymmetric": lambda w, g: fake_quantize_asymmetric(w, 4, g),
    "asymmetric + clip": lambda w, g: fake_quantize_asymmetric(w, 4, g, clip_search=True),
}


SHORT = {"sym": "symmetric", "sym-clip": "symmetric + clip", "signed": "symmetric, signed extreme (Q4_0's rule)",
         "asym": "asymmetric", "asym-clip": "asymmetric + clip"}

GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


def bits_per_weight(grid: str, group: int) -> float:
    return 4 + (32 if grid.startswith("asym") else 16) / group


def gguf_types(path: Path) -> dict[str, str]:
    """``{"<layer>.<module path>": GGUF tensor type}`` of the decoder Linears the model was dequantized from:
    a Linear stored in a finer grid than 4 bits (Q6_K, Q8_0) stands in for a float16 model's weights."""
    from gguf import GGMLQuantizationType, GGUFReader

    types = {t.name: GGMLQuantizationType(t.tensor_type).name for t in GGUFReader(str(path)).tensors}
    out = {}
    for name, t in types.items():
        parts = name.split(".")
        if parts[0] == "blk" and len(parts) == 4:
            hf = next((k for k, v in GGUF_NAMES.items() if v == parts[2]), None)
            if hf is not None:
                out[f"{parts[1]}.{hf}"] = t
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="float model (default: fptq's default model)")
    ap.add_argument("--groups", default="32,64", help="group sizes (default 32,64)")
    ap.add_argument("--grids", default=",".join(SHORT), help=f"grids to measure (default all: {','.join(SHORT)})")
    ap.add_argument("--wiki", type=int, default=8)
    ap.add_argument("--c4", type=int, default=8)
    ap.add_argument("--name", default="asym_int4")
    args = ap.parse_args()
    unknown = [g for g in args.grids.split(",") if g not in SHORT]
    if unknown:
        ap.error(f"unknown grid(s) {', '.join(unknown)}; choose from {', '.join(SHORT)}")
    torch.set_num_threads(2)
    model, tok, src = fptq.load_float_model(args.model, dtype=torch.float32)
    windows = eval_windows(tok, args.wiki, args.c4, 2048)
    ref_dir = reference_dir(src, windows)
    build_reference(model, windows, ref_dir)  # the float model's log-probabilities: reused when cached
    ref = load_reference(ref_dir)
    named = [(n, m) for n, m in model.model.layers.named_modules() if isinstance(m, torch.nn.Linear)]
    linears = [m for _, m in named]
    original = [m.weight.detach().clone() for m in linears]
    gguf = Path(args.model) if args.model and str(args.model).endswith(".gguf") else (
        default_gguf_path() if args.model is None else None)
    types = gguf_types(gguf) if gguf is not None else {}
    kinds = [types.get(n, "unknown") for n, _ in named]
    rows = {}
    for group in (int(g) for g in args.groups.split(",")):
        for grid in (SHORT[g] for g in args.grids.split(",")):
            fq = GRIDS[grid]
            t = time.perf_counter()
            err = num = 0.0
            per_type: dict[str, list[float]] = {}
            with torch.no_grad():
                for m, w, kind in zip(linears, original, kinds):
                    q = fq(w, group)
                    e, n = float((q - w).pow(2).sum()), float(w.pow(2).sum())
                    err, num = err + e, num + n
                    acc = per_type.setdefault(kind, [0.0, 0.0, 0])
                    acc[0], acc[1], acc[2] = acc[0] + e, acc[1] + n, acc[2] + 1
                    m.weight.copy_(q)
            qs = time.perf_counter() - t
            label = f"{grid}, group {group}"
            rows[label] = {"grid": grid, "group": group, "bits_per_weight": bits_per_weight(grid, group),
                           "relative_weight_mse": err / num, "quantize_s": qs,
                           "relative_weight_mse_by_gguf_type": {k: {"mse": v[0] / v[1], "linears": v[2]}
                                                                for k, v in per_type.items()},
                           **evaluate_all(model, windows, ref, desc=label)}
            r = rows[label]
            print(label, f"rel mse {err / num:.3e}", {k: (round(r[k]["ppl"], 3), round(r[k]["kld"], 4))
                                                       for k in windows}, flush=True)
    with torch.no_grad():
        for m, w in zip(linears, original):
            m.weight.copy_(w)
    float_row = evaluate_all(model, windows, ref, desc="float")
    lines = [f"# Symmetric vs asymmetric int4 weights, round to nearest: {Path(src).name}", "",
             f"Weights of every decoder Linear fake-quantized, activations and lm_head float; {args.wiki} + {args.c4} "
             f"windows of 2048 tokens; KLD = mean KL(float || quantized); {machine()['threads']} threads.", "",
             "| grid | bits / weight | rel. weight MSE | WikiText-2 ppl | KLD | C4 ppl | KLD |",
             "|---|---|---|---|---|---|---|",
             f"| float | 16 | 0 | {float_row['wikitext2']['ppl']:.3f} | 0 | {float_row['c4']['ppl']:.3f} | 0 |"]
    for label, r in rows.items():
        w, c = r["wikitext2"], r["c4"]
        lines.append(f"| {label} | {r['bits_per_weight']:.3f} | {r['relative_weight_mse']:.2e} | {w['ppl']:.3f} | "
                     f"{w['kld']:.4f} | {c['ppl']:.3f} | {c['kld']:.4f} |")
    kinds_seen = sorted({k for r in rows.values() for k in r["relative_weight_mse_by_gguf_type"]})
    if kinds_seen:
        first = next(iter(rows.values()))["relative_weight_mse_by_gguf_type"]
        lines += ["", "Relative weight MSE by the GGUF type each Linear was dequantized from (Linears: "
                  + ", ".join(f"{k} {first[k]['linears']}" for k in kinds_seen) + "):", "",
                  "| grid | " + " | ".join(kinds_seen) + " |", "|---|" + "---|" * len(kinds_seen)]
        for label, r in rows.items():
            by = r["relative_weight_mse_by_gguf_type"]
            lines.append(f"| {label} | " + " | ".join(f"{by[k]['mse']:.2e}" if k in by else "-" for k in kinds_seen)
                         + " |")
    lines += ["", "Command: `python bench/investigations/asym_int4.py " + " ".join(sys.argv[1:]) + "`"]
    write_results(args.name, {"model": str(src), "float": float_row, "rows": rows, "machine": machine()},
                  "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
