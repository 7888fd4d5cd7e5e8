"""How much of a same-recipe RTN W4A16 gap is the rounding of the group scales?

fptq stores int4 group scales in float16; llm-compressor keeps them in the model's dtype (float32 here).
Both compute ``absmax / 7.5`` and round ``w / s`` to -8..7, so the two tools' weights differ only where the
float16 rounding of ``s`` moves ``w / s`` across a rounding boundary. This script:

1. checks that float32 scales reproduce llm-compressor's RTN weights bit for bit (its effective weights,
   dumped by ``bench/_llmc_worker.py --dump-weights`` in its own venv), and that fptq's ``rtn-w4a16``
   weights (``scale_rounding="nearest"``, fptq's rounding when this was measured) are the float16-scale ones;
2. evaluates, on the same windows with one evaluator, the float model with the weights of: float32
   scales (= llm-compressor), float16 scales to nearest (= fptq then) and rounded down (fptq's RTN now), and float32 scales perturbed by a random relative
   ``2**-11 * u`` (``u`` uniform in -1..1, one seed per row: the size of float16's rounding, in random
   directions) -- equally good roundings of the same weights (their weight squared error is printed).

The spread of those rows is the noise floor of "one tool's RTN vs another's" on these windows.

    python bench/investigations/rtn_rounding_spread.py                       # SmolLM2-135M, group 64, 20 + 20 windows
    python bench/investigations/rtn_rounding_spread.py --model "$(../shared/tools/get-qwen2.5-coder-0.5b)" \\
        --group-size 128 --name rtn_rounding_spread_qwen

Writes bench/results/NAME.{json,md}.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

import fptq
from fptq.quant.weights import dequantize_weight, fp16_floor, quantize_weight, weight_scales

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: common.py and the scripts reused here

from _evalset import build_reference, evaluate_all, load_reference  # noqa: E402
from accuracy_sweep import eval_windows, reference_dir  # noqa: E402
from common import RESULTS, calibration_text, machine, model_arguments, write_results  # noqa: E402
from peer_llmcompressor import DEFAULT_VENV, llmc_weights, venv_python  # noqa: E402


def rtn_weight(w: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    return dequantize_weight(quantize_weight(w, scales, 4, group_size), scales.float(), group_size)


def fp32_scales(w: torch.Tensor, group_size: int) -> torch.Tensor:
    return w.float().reshape(w.shape[0], -1, group_size).abs().amax(-1).clamp_min(1e-8) / 7.5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_arguments(ap, nsamples=None, seqlen=None)
    ap.add_argument("--wiki", type=int, default=20)
    ap.add_argument("--c4", type=int, default=20)
    ap.add_argument("--variants", default="fp32,fp16,fp16-down,down,up,seed0,seed1,seed2",
                    help="rows: fp32, fp16, fp16-down, down, up, seed0..seed7 (random perturbations of fp32)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--venv", default=DEFAULT_VENV)
    ap.add_argument("--name", default="rtn_rounding_spread")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gs = args.group_size

    model, tok, src = fptq.load_float_model(args.model)
    calib = fptq.calibration_windows(tok, calibration_text(), 2, 64, seed=0)
    windows = eval_windows(tok, args.wiki, args.c4, 2048)
    ref_dir = reference_dir(src, windows)
    meta = build_reference(model, windows, ref_dir)
    reference = load_reference(ref_dir)

    # 1. the tools' weights
    llmc = llmc_weights(venv_python(args.venv), src, calib, "rtn-w4a16", gs, args.threads)
    q = copy.deepcopy(model)
    # fptq's RTN as it was when these rows were measured (scales to nearest); "fp16-down" is its default now
    fptq.quantize(q, fptq.method_config("rtn-w4a16", group_size=gs, scale_rounding="nearest"), calib,
                  device="cpu", progress=False)
    qmods, fmods = dict(q.named_modules()), dict(model.named_modules())
    names = [n[: -len(".weight")] if n.endswith(".weight") else n for n in llmc]
    check = {"linears": len(names), "weights": 0, "fp32_vs_llmc_differ": 0, "fptq_vs_fp16scale_differ": 0,
             "codes_fp16_vs_fp32_differ": 0}
    for n, key in zip(names, llmc):
        w = fmods[n].weight.detach().float()
        s32, s16 = fp32_scales(w, gs), weight_scales(w, 4, gs, rounding="nearest")
        check["weights"] += w.numel()
        check["fp32_vs_llmc_differ"] += int((rtn_weight(w, s32, gs) != llmc[key].float()).sum())
        check["fptq_vs_fp16scale_differ"] += int((qmods[n].dequantized_weight() != rtn_weight(w, s16, gs)).sum())
        check["codes_fp16_vs_fp32_differ"] += int((quantize_weight(w, s16, 4, gs) != quantize_weight(w, s32, 4, gs)).sum())
    del q, llmc
    print(check, flush=True)

    # 2. equally good roundings, evaluated
    variants = {"fp32": ("float32 scales (= llm-compressor)", lambda w, n: fp32_scales(w, gs)),
                "fp16": ("float16 scales, rounded to nearest (= fptq)", lambda w, n: weight_scales(w, 4, gs, rounding="nearest").float()),
                "fp16-down": ("float16 scales, rounded down", lambda w, n: fp16_floor(fp32_scales(w, gs)).float()),
                "down": ("float32 scales x (1 - 2^-11)", lambda w, n: fp32_scales(w, gs) * (1 - 2.0 ** -11)),
                "up": ("float32 scales x (1 + 2^-11)", lambda w, n: fp32_scales(w, gs) * (1 + 2.0 ** -11))}
    for seed in range(8):
        def perturbed(w, n, seed=seed):
            g = torch.Generator().manual_seed(seed * 100003 + names.index(n))
            s = fp32_scales(w, gs)
            return s * (1 + 2.0 ** -11 * (2 * torch.rand(s.shape, generator=g) - 1))
        variants[f"seed{seed}"] = (f"float32 scales x (1 + 2^-11 u), seed {seed}", perturbed)
    unknown = [v for v in args.variants.split(",") if v not in variants]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {list(variants)}")
    rows = {}
    out_json = RESULTS / f"{args.name}.json"
    if out_json.exists():  # add rows to an earlier run with the same settings
        old = json.loads(out_json.read_text())
        if all(old["settings"].get(k) == getattr(args, k) for k in ("model", "group_size", "wiki", "c4")):
            rows = old["rows"]
    for key in args.variants.split(","):
        label, scales_of = variants[key]
        if label in rows:
            continue
        m = copy.deepcopy(model)
        mods = dict(m.named_modules())
        sq_err, flips = 0.0, 0
        with torch.no_grad():
            for n in names:
                lin = mods[n]
                w = lin.weight.detach().float()
                s = scales_of(w, n)
                wq = rtn_weight(w, s, gs)
                sq_err += float((wq - w).pow(2).sum())
                flips += int((quantize_weight(w, s, 4, gs) != quantize_weight(w, fp32_scales(w, gs), 4, gs)).sum())
                lin.weight.copy_(wq.to(lin.weight.dtype))
        t = time.perf_counter()
        rows[label] = {"weight_sq_err": sq_err, "codes_differ_from_fp32": flips,
                       "metrics": evaluate_all(m, windows, reference, desc=label), "eval_s": time.perf_counter() - t}
        met = rows[label]["metrics"]
        print(label, {k: (round(v["ppl"], 3), round(v["kld"], 4)) for k, v in met.items()}, flush=True)
        del m

    data = {"settings": vars(args), "machine": machine(), "model": str(src), "check": check,
            "float": meta["float"], "rows": rows}
    sets = list(windows)
    md = [f"# RTN W4A16: the spread from rounding the group scales ({Path(src).name}, group {gs})\n",
          f"`python bench/investigations/rtn_rounding_spread.py{'' if args.model is None else ' --model ...'} "
          f"--group-size {gs} "
          f"--wiki {args.wiki} --c4 {args.c4} --variants ... --name {args.name}` (rows added run by run; each "
          "evaluated alone on the machine)\n",
          f"Weights: {check['weights']:,} in {check['linears']} Linears. float32 scales reproduce llm-compressor's "
          f"RTN weights with {check['fp32_vs_llmc_differ']} values differing; fptq's `rtn-w4a16` equals the "
          f"float16-scale weights with {check['fptq_vs_fp16scale_differ']} differing; float16 vs float32 scales "
          f"change {check['codes_fp16_vs_fp32_differ']:,} codes "
          f"({100 * check['codes_fp16_vs_fp32_differ'] / check['weights']:.2f}%).\n",
          "| weights | codes unlike float32's | weight sq. error | "
          + " | ".join(f"{s} ppl | {s} KLD | {s} top-1" for s in sets) + " |",
          "|---" * (3 + 3 * len(sets)) + "|",
          "| float | — | — | " + " | ".join(f"{meta['float'][s]['ppl']:.3f} | 0 | 100%" for s in sets) + " |"]
    for label, r in rows.items():
        md.append(f"| {label} | {r['codes_differ_from_fp32']:,} | {r['weight_sq_err']:.1f} | "
                  + " | ".join(f"{r['metrics'][s]['ppl']:.3f} | {r['metrics'][s]['kld']:.4f} | "
                               f"{100 * r['metrics'][s]['top1']:.2f}%" for s in sets) + " |")
    write_results(args.name, data, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
