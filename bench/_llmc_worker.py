"""Worker of bench/peer_llmcompressor.py: one llm-compressor recipe in llm-compressor's own venv.

Run by the parent with the venv's python (never import it from fptq's environment)::

    /work/venvs/llmc/bin/python bench/_llmc_worker.py --model-dir DIR --windows W.safetensors \
        --ref-cache REF --recipe gptq-w4a16 --group-size 64 --out result.json [--threads N]

``W.safetensors`` holds the parent's token-id windows: ``calib`` ([nsamples, seqlen], the
same windows fptq calibrates on) and ``eval_wikitext2`` / ``eval_c4`` ([n, 2048] evaluation
windows). ``REF`` is the parent's cache of the float model's log-probabilities on those
windows (``bench/_evalset.py``). The worker loads the float model from ``DIR`` with plain
transformers, runs ``oneshot`` (the only timed part), keeps the model in memory and scores it
with the parent's evaluator (``bench/_evalset.py`` over ``fptq.eval.perplexity``, imported from
this checkout): perplexity, KL divergence and top-1 agreement against the float model.
After ``oneshot`` every targeted Linear runs compressed-tensors' fake-quant forward:
weights quantize-dequantized with the calibrated scales, and (W8A8/W4A8) the input
quantize-dequantized per token with a dynamic int8 scale, or per tensor with the static
scale calibrated by llm-compressor's default observer (naive W4A8), on every call.

Recipe ``float`` skips oneshot: the float model evaluated in this venv (its transformers
may differ from fptq's), a check that both environments compute the same float numbers.
``--dump-weights FILE`` also saves the effective (quantize-dequantized) weight of every
quantized Linear (for W4A8 recipes: the weight after equalization), to compare them with fptq's.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
sys.path.insert(0, str(SRC))
sys.path.insert(0, str(HERE))

# activations: symmetric int8, one scale per token computed on the fly
A8_DYN_TOKEN = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
# activations: symmetric int8, one static scale per tensor (llm-compressor's default observer for it)
A8_STATIC_TENSOR = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "tensor", "dynamic": False}

RECIPES = ("float", "rtn-w4a16", "gptq-w4a16", "gptq-w4a16-f16scale", "gptq-w4a16-mse", "smoothquant-w8a8",
           "logeq-w4a8", "logeq-w4a8-f16scale", "naive-w4a8")


def w4(group_size: int, scale_dtype: str | None = None, observer: str | None = None) -> dict:
    """Weights: symmetric int4 in groups of ``group_size`` along the input dimension; ``scale_dtype``
    rounds every scale to that dtype as it is computed (compressed-tensors' ``scale_dtype``: to nearest);
    ``observer`` replaces the default min-max observer of the weights ("mse": llm-compressor's clip search)."""
    args = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": group_size}
    if scale_dtype:
        args["scale_dtype"] = scale_dtype
    if observer:
        args["observer"] = observer
    return args


def build_recipe(name: str, group_size: int):
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

    W4 = w4(group_size)
    if name == "rtn-w4a16":
        # QuantizationModifier = round-to-nearest weights (memoryless min-max observer)
        return [QuantizationModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": W4}},
                                     ignore=["lm_head"])]
    if name in ("gptq-w4a16", "gptq-w4a16-f16scale", "gptq-w4a16-mse"):
        # as fptq gptq-w4a16: damp 0.01, block 128, static act-order (llm-compressor's default actorder; group
        # scales from the weights before GPTQ, columns in order of decreasing Hessian diagonal). The f16scale
        # variant rounds its scales to float16 (nearest) before GPTQ uses them, as fptq's checkpoint does; the
        # mse variant searches each group's clip with llm-compressor's MSE observer (shrink up to 20%)
        weights = (w4(group_size, "float16") if name.endswith("f16scale")
                   else w4(group_size, observer="mse") if name.endswith("-mse") else W4)
        return [GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
                             ignore=["lm_head"], dampening_frac=0.01, block_size=128, actorder="static")]
    if name == "smoothquant-w8a8":
        # preset W8A8: int8 symmetric per-channel weights, int8 symmetric dynamic per-token inputs;
        # QuantizationModifier = round-to-nearest weights, like fptq smoothquant-w8a8 (gptq=False)
        return [SmoothQuantModifier(smoothing_strength=0.5),
                QuantizationModifier(targets=["Linear"], scheme="W8A8", ignore=["lm_head"])]
    if name in ("logeq-w4a8", "logeq-w4a8-f16scale"):
        # LogarithmicEqualizationModifier is a deprecated alias of exactly this in 0.14; the f16scale variant
        # rounds the weight scales to float16 (nearest), as fptq's checkpoint stores them
        weights = w4(group_size, "float16") if name.endswith("f16scale") else W4
        return [SmoothQuantModifier(algorithm="log_equalization"),
                QuantizationModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights,
                                                                "input_activations": A8_DYN_TOKEN}},
                                     ignore=["lm_head"])]
    if name == "naive-w4a8":
        # every input static per tensor (the default observer: moving-average min-max), RTN weights
        return [QuantizationModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": W4,
                                                                "input_activations": A8_STATIC_TENSOR}},
                                     ignore=["lm_head"])]
    raise SystemExit(f"unknown recipe {name!r}; choose one of {RECIPES}")


def quant_summary(model, x_cols: int | None = None) -> dict:
    """What the evaluated model computes: per-module scheme/status counts, and a direct
    check that input (activation) fake-quant changes a Linear's output."""
    import torch

    statuses, schemes, example = {}, {}, None
    for name, m in model.named_modules():
        scheme = getattr(m, "quantization_scheme", None)
        if scheme is None:
            continue
        status = str(getattr(m, "quantization_status", None))
        statuses[status] = statuses.get(status, 0) + 1
        w, a = scheme.weights, scheme.input_activations
        key = (f"W{w.num_bits} {w.strategy}" + (f" g{w.group_size}" if w.group_size else "")
               if w else "W-float") + (f" / A{a.num_bits} {a.strategy} dynamic={a.dynamic}" if a else " / A-float")
        schemes[key] = schemes.get(key, 0) + 1
        if example is None:
            example = (name, m)
    out = {"quantized_modules": sum(statuses.values()), "status": statuses, "schemes": schemes}
    if example is not None:
        name, m = example
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 16, m.in_features, generator=g, dtype=m.weight.dtype)
        x[..., :4] *= 30  # a few outlier channels, as real activations have
        with torch.no_grad():
            full = m(x)
            scheme = m.quantization_scheme
            m.quantization_scheme = scheme.model_copy(update={"input_activations": None})
            try:
                w_only = m(x)
            finally:
                m.quantization_scheme = scheme
            plain = torch.nn.functional.linear(x, m.weight, m.bias)
        rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
        out["check_module"] = name
        out["rel_diff_input_quant_vs_weight_only"] = rel(full, w_only)
        out["rel_diff_weight_only_vs_plain_linear"] = rel(w_only, plain)
    return out


def effective_weights(model) -> dict:
    """The weight each quantized Linear multiplies by: its forward on the identity, minus the bias, with
    input (activation) fake-quant switched off for the call (an int8 identity row would come back as
    127 / 127.5 of itself)."""
    import torch

    out = {}
    with torch.no_grad():
        for name, m in model.named_modules():
            sch = getattr(m, "quantization_scheme", None)
            if sch is None or not isinstance(m, torch.nn.Linear):
                continue
            if sch.input_activations is not None:
                m.quantization_scheme = sch.model_copy(update={"input_activations": None})
            try:
                eye = torch.eye(m.in_features, dtype=m.weight.dtype)
                y = m(eye)
            finally:
                m.quantization_scheme = sch
            if m.bias is not None:
                y = y - m.bias
            out[name] = y.t().contiguous().float()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--windows", required=True, help=".safetensors with 'calib' and 'eval_<set>' token ids")
    ap.add_argument("--ref-cache", default=None, help="the parent's float log-probabilities (bench/_evalset.py)")
    ap.add_argument("--recipe", required=True, choices=RECIPES)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--out", required=True, help="JSON result file")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--dump-weights", default=None, help="save the effective (quantize-dequantized) weights")
    ap.add_argument("--act-check-windows", type=int, default=1,
                    help="re-evaluate this many WikiText-2 windows with input (activation) fake-quant switched off")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from _evalset import evaluate_all, load_reference, load_windows
    from fptq.eval.perplexity import evaluate_perplexity

    calib, windows = load_windows(Path(args.windows))
    reference = load_reference(Path(args.ref_cache)) if args.ref_cache else None
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    model.eval()

    import transformers

    res: dict = {"recipe": args.recipe, "transformers": transformers.__version__, "torch": torch.__version__,
                 "python": platform.python_version(), "threads": torch.get_num_threads(),
                 "group_size": args.group_size}
    if args.recipe != "float":
        import compressed_tensors
        import llmcompressor
        from llmcompressor import oneshot
        from torch.utils.data import DataLoader

        res["llmcompressor"] = llmcompressor.__version__
        res["compressed_tensors"] = compressed_tensors.__version__
        recipe = build_recipe(args.recipe, args.group_size)
        res["recipe_repr"] = [repr(m) for m in recipe]
        rows = [{"input_ids": calib[i: i + 1], "attention_mask": torch.ones_like(calib[i: i + 1])}
                for i in range(calib.shape[0])]
        loader = DataLoader(rows, batch_size=None, shuffle=False)  # one window a batch, in fptq's order
        t = time.perf_counter()
        model = oneshot(model=model, tokenizer=args.model_dir, dataset=loader, recipe=recipe,
                        num_calibration_samples=calib.shape[0], max_seq_length=calib.shape[1],
                        shuffle_calibration_samples=False)
        res["oneshot_s"] = time.perf_counter() - t
        model.eval()
        res["quant"] = quant_summary(model)
        if args.dump_weights:
            from safetensors.torch import save_file

            save_file(effective_weights(model), args.dump_weights)
    t = time.perf_counter()
    res["metrics"] = evaluate_all(model, windows, reference, desc=args.recipe)
    res["eval_s"] = time.perf_counter() - t
    if args.recipe != "float" and args.act_check_windows > 0 and res["quant"]["schemes"] and any(
            "A-float" not in k for k in res["quant"]["schemes"]):
        w = next(iter(windows.values()))
        k = min(args.act_check_windows, w.shape[0])
        on = evaluate_perplexity(model, w[:k], desc="act-quant on", progress=False)["ppl"]
        saved = {}
        for name, m in model.named_modules():
            sch = getattr(m, "quantization_scheme", None)
            if sch is not None and sch.input_activations is not None:
                saved[name] = sch
                m.quantization_scheme = sch.model_copy(update={"input_activations": None})
        off = evaluate_perplexity(model, w[:k], desc="act-quant off", progress=False)["ppl"]
        for name, sch in saved.items():
            model.get_submodule(name).quantization_scheme = sch
        res["act_check"] = {"windows": k, "ppl_act_quant_on": on, "ppl_act_quant_off": off,
                            "modules_switched": len(saved)}
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(json.dumps({k: v for k, v in res.items() if k != "recipe_repr"}), flush=True)


if __name__ == "__main__":
    main()
