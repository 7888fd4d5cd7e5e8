"""Where do fptq's and llm-compressor's GPTQ weights part, end to end?

Both tools quantize the same float model with GPTQ W4A16 (static act-order, damp 0.01, block 128) on
the same calibration windows, each through its own sequential pipeline: every decoder layer's Hessians
come from the inputs that the already-quantized earlier layers produce. llm-compressor runs the
``gptq-w4a16-f16scale`` recipe (its group scales rounded to float16 as fptq's are), so on identical
Hessians the two would give the same weights (``bench/investigations/gptq_vs_llmc_layer.py``: 0.0018% of codes differ,
float32 summation order). This script compares the two tools' final weights Linear by Linear:

* the share of weights whose dequantized value differs between the tools (same scales, so a different code);
* ``||W_fptq - W_llmc|| / ||W_llmc - W_float||``: the tools' difference relative to the quantization error.

Layer 0 sees the same (float) inputs in both tools. If the shares are near zero there and grow with depth,
the tools differ only by how tiny differences compound through the sequential calibration; a jump at one
layer or one kind of Linear would point at a systematic difference in what that Linear's Hessian is built
from.

    python bench/investigations/gptq_codes_vs_llmc.py --model "$(../shared/tools/get-qwen2.5-coder-0.5b)" \\
        --group-size 128 --name gptq_codes_vs_llmc_qwen

``--method`` / ``--recipe`` pick another pair, e.g. ``--method lae-dynamic-w4a8 --recipe logeq-w4a8``:
log-equalization then round-to-nearest (fptq's scales float16 rounded down, llm-compressor's float32), where
the weights compared are the equalized ones; at layer 0 they differ only where the scales' rounding moves a
code if the two tools' equalization scales agree, and by much more if they do not.

Needs the llm-compressor venv of ``bench/peer_llmcompressor.py``. Writes bench/results/NAME.{json,md}.
"""
from __future__ import annotations

import argparse
import copy
import re
import sys
import time
from pathlib import Path

import torch

import fptq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: common.py and the scripts reused here

from common import calibration_text, machine, model_arguments, write_results  # noqa: E402
from peer_llmcompressor import DEFAULT_VENV, llmc_weights, venv_python  # noqa: E402

KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def method_from_spec(spec: str, group_size: int):
    """``"method:key=value;key=value"`` (as ``bench/accuracy_sweep.py``'s variants) -> a QuantConfig."""
    method, _, opts = spec.partition(":")
    kw = dict(o.split("=", 1) for o in opts.split(";") if o)
    return fptq.method_config(method, group_size=group_size, **kw)


def compare(w_fptq: torch.Tensor, w_llmc: torch.Tensor, w_float: torch.Tensor) -> dict:
    """The share of weights that differ between the tools, and their difference relative to the
    quantization error (both tools dequantize ``code * scale`` in float32, so equal codes give equal values)."""
    cols = w_fptq.norm(dim=0) / w_llmc.norm(dim=0).clamp_min(1e-30)
    return {"n": w_fptq.numel(), "differ": int((w_fptq != w_llmc).sum()),
            "rel": float((w_fptq - w_llmc).norm() / (w_llmc - w_float).norm().clamp_min(1e-30)),
            # for pairs whose scales differ in dtype (every value differs) or that equalize (W_float is not
            # the weight quantized): the tools' difference relative to the weight, and how far the input
            # columns' norms (the equalization scales) disagree
            "rel_w": float((w_fptq - w_llmc).norm() / w_llmc.norm().clamp_min(1e-30)),
            "col_dev": float((cols - 1).abs().median())}


def by_layer(rows: dict[str, dict]) -> list[dict]:
    """Rows of ``{layer, kind -> share differing %, all -> share %, rel}`` per decoder layer."""
    layers: dict[int, dict[str, dict]] = {}
    for name, r in rows.items():
        m = re.search(r"layers\.(\d+)\..*\.(\w+)$", name)
        if m:
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = r
    out = []
    for i in sorted(layers):
        d = layers[i]
        n, differ = sum(r["n"] for r in d.values()), sum(r["differ"] for r in d.values())
        out.append({"layer": i, **{k: 100 * d[k]["differ"] / d[k]["n"] for k in KINDS if k in d},
                    "all": 100 * differ / n, "rel_mean": sum(r["rel"] for r in d.values()) / len(d),
                    **{f"rel_w_{k}": 100 * d[k]["rel_w"] for k in KINDS if k in d},
                    **{f"col_dev_{k}": 100 * d[k]["col_dev"] for k in KINDS if k in d}})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_arguments(ap)
    ap.add_argument("--calib-seed", type=int, default=0)
    ap.add_argument("--method", default="gptq-w4a16", help="fptq method")
    ap.add_argument("--recipe", default="gptq-w4a16-f16scale",
                    help="llm-compressor recipe (bench/_llmc_worker.py), or 'fptq:METHOD:key=value;...' to compare "
                         "fptq with itself under other settings (the spread of equally valid runs)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--venv", default=DEFAULT_VENV)
    ap.add_argument("--name", default="gptq_codes_vs_llmc")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gs = args.group_size
    py = None if args.recipe.startswith("fptq:") else venv_python(args.venv)

    model, tok, src = fptq.load_float_model(args.model)
    calib = fptq.calibration_windows(tok, calibration_text(), args.nsamples, args.seqlen, seed=args.calib_seed)
    t = time.perf_counter()
    if args.recipe.startswith("fptq:"):  # fptq against itself with other settings: the spread of one tool
        other = copy.deepcopy(model)
        fptq.quantize(other, method_from_spec(args.recipe[len("fptq:"):], gs), calib, device="cpu", progress=False)
        omods = dict(other.named_modules())
        llmc = {n: m.dequantized_weight().float() for n, m in omods.items() if hasattr(m, "dequantized_weight")}
        del other, omods
    else:
        llmc = llmc_weights(py, src, calib, args.recipe, gs, args.threads)
    llmc_s = time.perf_counter() - t

    q = copy.deepcopy(model)
    t = time.perf_counter()
    fptq.quantize(q, fptq.method_config(args.method, group_size=gs), calib, device="cpu", progress=False)
    fptq_s = time.perf_counter() - t
    qmods, fmods = dict(q.named_modules()), dict(model.named_modules())
    rows = {}
    with torch.no_grad():
        for name, w_llmc in llmc.items():
            rows[name] = compare(qmods[name].dequantized_weight().float(), w_llmc.float(),
                                 fmods[name].weight.detach().float())
    layers = by_layer(rows)
    n, differ = sum(r["n"] for r in rows.values()), sum(r["differ"] for r in rows.values())

    settings = vars(args)
    pair = "" if (args.method, args.recipe) == ("gptq-w4a16", "gptq-w4a16-f16scale") else \
        f" --method {args.method} --recipe {args.recipe}"
    seed = f" --calib-seed {args.calib_seed}" if args.calib_seed else ""
    cmd = (f"python bench/investigations/gptq_codes_vs_llmc.py{' --model ' + repr(args.model) if args.model else ''} "
           f"--group-size {gs}{pair}{seed} --name {args.name}")
    how = ("both static act-order, damp 0.01, block 128, float16 scales to nearest" if not pair
           else "see bench/_llmc_worker.py and fptq.methods for each")
    other_tool = "fptq" if args.recipe.startswith("fptq:") else "llm-compressor"
    md = [f"# fptq `{args.method}` weights vs {other_tool} `{args.recipe}`, end to end ({Path(src).name}, "
          f"group {gs})\n",
          f"`{cmd}` ({how}; the same {args.nsamples} x {args.seqlen} calibration windows, seed "
          f"{args.calib_seed}; each tool's sequential pipeline). Run alone, {args.threads} threads; quantize + "
          f"dump {llmc_s:.0f} s ({other_tool}, second run), {fptq_s:.0f} s (fptq).\n",
          f"Overall {differ:,} of {n:,} weights differ ({100 * differ / n:.3f}%).\n"]
    if not pair:
        md += ["Share of weights whose code differs between the tools (%), per decoder layer and Linear; `rel` = mean "
               "over the layer's Linears of ||W_fptq - W_llmc|| / ||W_llmc - W_float||:\n",
               "| layer | " + " | ".join(KINDS) + " | all | rel |", "|---" * (len(KINDS) + 3) + "|"]
        for r in layers:
            md.append(f"| {r['layer']} | " + " | ".join(f"{r[k]:.3f}" if k in r else "-" for k in KINDS)
                      + f" | {r['all']:.3f} | {r['rel_mean']:.3f} |")
    else:  # scales of different dtypes: every value differs, so compare sizes instead of codes
        md += ["Per decoder layer and Linear: ||W_fptq - W_llmc|| / ||W_llmc|| (%), then in brackets the median over "
               "input columns of |norm of fptq's column / norm of llm-compressor's - 1| (%), which an "
               "equalization-scale disagreement would raise:\n",
               "| layer | " + " | ".join(KINDS) + " |", "|---" * (len(KINDS) + 1) + "|"]
        for r in layers:
            md.append(f"| {r['layer']} | " + " | ".join(
                f"{r['rel_w_' + k]:.2f} ({r['col_dev_' + k]:.2f})" if "rel_w_" + k in r else "-" for k in KINDS)
                + " |")
    write_results(args.name, {"settings": settings, "machine": machine(), "model": str(src), "llmc_s": llmc_s,
                              "fptq_s": fptq_s, "overall_differ": differ, "overall_n": n, "layers": layers,
                              "linears": rows}, "\n".join(md) + "\n")
    print("\n".join(md[-len(layers) - 2:]), flush=True)


if __name__ == "__main__":
    main()
