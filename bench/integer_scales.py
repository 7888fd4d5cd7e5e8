"""Integer group scales (``fptq quantize --group-scales integer``) against float16 group scales: the same model
quantized both ways, speed through the transformers API on fptq's runtime and perplexity, in one process.

Rows (interleaved repeats, ratios of medians to the 16-bit baseline, :func:`fptq.bench.baseline_dtype`):

* the source model through transformers (bf16 on CPUs with fast bf16 products);
* ``fptq.load(FLOAT)``: the checkpoint with float16 group scales (fptq's default);
* ``fptq.load(INTEGER)``: the checkpoint with integer group scales (the AMX kernel sums over all of K in int32).

Tasks: ``prefill_N`` (``model(ids)``, every position's logits, the call a transformers user makes),
``last_N`` (``model(ids, logits_to_keep=1)``, what ``generate`` asks of a prompt), ``decode_b1`` (32 steps after
a 16-token prompt, :class:`fptq.runtime.timing.HFRunner`). Then WikiText-2 and C4 perplexity of both checkpoints
on ``fptq eval``'s path (``fptq.load(OUT, runtime="off")``), same windows.

    python bench/integer_scales.py --float smollm2-w4a8 --integer smollm2-w4a8-int --name integer_scales_smollm2

Run alone on the machine. Results: ``bench/results/<name>.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from common import c4_eval_path, machine, wikitext_path, write_results


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--float", dest="float_ckpt", required=True, help="checkpoint with float16 group scales")
    p.add_argument("--integer", dest="int_ckpt", required=True, help="the same model with --group-scales integer")
    p.add_argument("--source", default=None, help="the 16-bit model (default: the float checkpoint's source)")
    p.add_argument("--prefill", default="512,2048")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--ppl-windows", type=int, default=8, help="WikiText-2 and C4 windows of 2048 (0: no perplexity)")
    p.add_argument("--name", default="integer_scales")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    import fptq
    from fptq.bench import baseline_dtype
    from fptq.eval.perplexity import evaluate_perplexity, load_eval_text, token_windows
    from fptq.models.loading import load_float_model
    from fptq.runtime.timing import HFRunner

    ckpts = {"float16 group scales": Path(a.float_ckpt), "integer group scales": Path(a.int_ckpt)}
    report = json.loads((ckpts["float16 group scales"] / "quantize_report.json").read_text())
    base_dtype = baseline_dtype(torch.device("cpu"))
    base = {torch.bfloat16: "bf16", torch.float32: "fp32"}[base_dtype]
    fmodel, tok, _ = load_float_model(a.source or report.get("source_model"), dtype=base_dtype)
    models = {f"{base} (transformers)": fmodel}
    models.update({f"W4A8, {k}": fptq.load(p) for k, p in ckpts.items()})
    vocab = fmodel.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = {}
    for n in (int(x) for x in a.prefill.split(",") if x):
        ids = torch.randint(0, vocab, (1, n), generator=g)
        prompts[f"prefill_{n}"], prompts[f"last_{n}"] = ids, ids
    prompts["decode_b1"] = torch.randint(0, vocab, (1, 16), generator=g)
    runners = {name: HFRunner(m) for name, m in models.items()}

    def run(name, task, ids):
        m = models[name]
        if task.startswith("decode"):
            return ids.shape[0] * a.new_tokens / runners[name].decode(ids, a.new_tokens)
        t0 = time.perf_counter()
        m(ids) if task.startswith("prefill") else m(ids, logits_to_keep=1)
        return ids.numel() / (time.perf_counter() - t0)

    raw = {name: {t: [] for t in prompts} for name in models}
    with torch.inference_mode():
        for name, m in models.items():  # warm-up: kernel builds, weight repacking
            m(prompts["decode_b1"])
        for _ in range(a.repeats):
            for task, ids in prompts.items():
                for name in models:
                    raw[name][task].append(run(name, task, ids))
    ref = raw[f"{base} (transformers)"]
    speed = {name: {t: {"tokens_per_s": statistics.median(v), "all": v,
                        "ratio_vs_baseline": statistics.median(v) / statistics.median(ref[t])}
                    for t, v in per.items()} for name, per in raw.items()}
    ppl = {}
    if a.ppl_windows:
        for data, path in (("wikitext2", wikitext_path()), ("c4", c4_eval_path())):
            windows = token_windows(tok, load_eval_text(str(path)), 2048, a.ppl_windows)
            ppl[data] = {k: evaluate_perplexity(fptq.load(p, runtime="off"), windows, desc=f"{data} {k}")["ppl"]
                         for k, p in ckpts.items()}
    data = {"machine": machine(), "checkpoints": {k: str(p) for k, p in ckpts.items()}, "baseline": base,
            "repeats": a.repeats, "speed": speed, "perplexity": ppl, "ppl_windows": a.ppl_windows}
    tasks = list(prompts)
    md = [f"# Integer against float16 group scales ({Path(a.float_ckpt).name}, {Path(a.int_ckpt).name})", "",
          f"{machine()['platform']}, {torch.get_num_threads()} threads; tokens/s (median of {a.repeats} interleaved "
          f"repeats) and ratio to {base} through transformers. prefill_N: `model(ids)`, every position's logits; "
          "last_N: `logits_to_keep=1`; decode_b1: 32 steps after a 16-token prompt.", "",
          "| | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for name, per in speed.items():
        md.append(f"| {name} | " + " | ".join(f"{per[t]['tokens_per_s']:.0f} ({per[t]['ratio_vs_baseline']:.2f}x)"
                                               for t in tasks) + " |")
    i, f = speed["W4A8, integer group scales"], speed["W4A8, float16 group scales"]
    md.append("| integer over float16 scales | " + " | ".join(
        f"{i[t]['tokens_per_s'] / f[t]['tokens_per_s']:.2f}x" for t in tasks) + " |")
    if ppl:
        md += ["", f"Perplexity (`fptq eval`'s path, {a.ppl_windows} windows of 2048 tokens):", "",
               "| | " + " | ".join(ppl) + " |", "|---|" + "---|" * len(ppl)]
        for k in ckpts:
            md.append(f"| {k} | " + " | ".join(f"{ppl[d][k]:.3f}" for d in ppl) + " |")
    write_results(a.name, data, "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
