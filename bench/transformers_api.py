"""Speed through the transformers API: ``fptq.load(OUT)`` then ``model(...)`` / ``model.generate(...)``, as a
transformers user calls any causal LM, against the 16-bit source model through transformers (bf16 on CPUs with
fast bf16 products, fp32 on AVX2 CPUs where bf16 is emulated: :func:`fptq.bench.baseline_dtype`).

Rows, each timed the same way in one process with interleaved repeats (ratios of medians to the baseline row):

* ``bf16 (transformers)`` (or ``fp32``): the source model in the baseline dtype;
* ``W4A8 fptq.load (runtime)``: ``fptq.load(OUT)``, whose forward and ``generate`` run on fptq's runtime;
* ``W4A8 fptq.load (modules)``: ``fptq.load(OUT, runtime="off")``, fptq's kernels Linear by Linear inside
  transformers' forward (what ``fptq.load`` gave before the runtime went behind it);
* ``W4A8 Engine``: ``fptq.Engine.from_checkpoint(OUT)`` called directly (its own generate), the runtime's own
  speed.

Tasks: ``prefill_N``: ``model(ids)`` on one N-token prompt (all logits, the call a user makes);
``generate_bB``: ``model.generate`` of 32 new tokens (greedy, ``min_new_tokens`` = ``max_new_tokens``) after a
16-token prompt, batch B (tokens/s counts the new tokens; the prompt's forward is inside the timing);
``decode_bB``: the same 32 steps as a loop of ``model(next_ids, cache=cache, logits_to_keep=1)`` after the
prompt, the prompt outside the timing (:class:`fptq.runtime.timing.HFRunner`, what ``fptq bench`` times). Then the perplexity of the runtime with
the int8 output head on every position (``head="int8"``), with the checkpoint's stored head, and of the modules
row on the same WikiText-2 and C4 windows: the runtime's logits are the integer kernels' (target: within 0.5 % of
``fptq eval``, which runs the modules path). A fourth perplexity, the modules with ``backend="reference"`` (the
float32 simulation the kernels are tested against), shows how far two correct paths drift apart: float rounding
that differs in the last bit moves a few activations across an int8 rounding boundary, and the quantized model
carries such flips through every later layer (docs/results/speed.md, "The runtime's perplexity").

Run alone on the machine::

    python bench/transformers_api.py --checkpoint smollm2-w4a8 --repeats 3 --name transformers_api_smollm2

Results: ``bench/results/<name>.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import c4_eval_path, machine, wikitext_path, write_results  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="fptq W4A8 checkpoint (fptq quantize output)")
    p.add_argument("--float-model", default=None, help="16-bit baseline (default: the checkpoint's source_model)")
    p.add_argument("--prefill", default="512", help="prompt lengths for model(ids) (default 512)")
    p.add_argument("--batches", default="1,16", help="generate batch sizes (default 1,16)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ppl-windows", type=int, default=8, help="WikiText-2 and C4 windows of 2048 for the perplexity check (0: no perplexity check)")
    p.add_argument("--ppl-only", action="store_true", help="skip the speed rows, measure the perplexities only")
    p.add_argument("--head", default="auto", help="the runtime's output head (auto, int8, stored; default auto)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--name", default="transformers_api")
    a = p.parse_args(argv)
    if a.ppl_windows < 0 or (a.ppl_only and not a.ppl_windows):
        p.error("--ppl-windows must be 0 (no perplexity check) or more, and at least 1 with --ppl-only")
    return a


def _generate_hf(model, ids, n):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=0)


def main(argv=None) -> int:
    a = parse_args(argv)
    import fptq
    from fptq.bench import baseline_dtype
    from fptq.eval.perplexity import evaluate_perplexity, load_eval_text, token_windows
    from fptq.models.loading import load_float_model
    from fptq.runtime.hf_fast import uses_runtime

    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.checkpoint)
    report = json.loads((out / "quantize_report.json").read_text())
    src = a.float_model or report.get("source_model")
    base_dtype = baseline_dtype(torch.device("cpu"))
    base = {torch.bfloat16: "bf16", torch.float32: "fp32"}[base_dtype]
    fmodel, tok, src_dir = load_float_model(src, dtype=base_dtype)
    fast = fptq.load(out, head=a.head)
    if not uses_runtime(fast):
        sys.exit("fptq.load did not attach fptq's runtime here (see the log); nothing to measure")
    modules = fptq.load(out, runtime="off")
    from fptq.runtime import load_for_runtime
    from fptq.runtime.timing import EngineRunner, HFRunner

    er = EngineRunner(load_for_runtime(out), head=a.head)  # what fptq.Engine.from_checkpoint(OUT) builds
    engine = er.engine

    def hf_rows(model):
        r = HFRunner(model)
        return {"prefill": lambda ids: model(ids), "generate": lambda ids: _generate_hf(model, ids, a.new_tokens),
                "decode": lambda ids: r.decode(ids, a.new_tokens)}

    rows = {f"{base} (transformers)": hf_rows(fmodel), "W4A8 fptq.load (runtime)": hf_rows(fast),
            "W4A8 fptq.load (modules)": hf_rows(modules),
            "W4A8 Engine": {"prefill": lambda ids: engine.forward(ids, engine.new_cache(*ids.shape), logits="all"),
                            "generate": lambda ids: engine.generate(ids, a.new_tokens),
                            "decode": lambda ids: er.decode(ids, a.new_tokens)}}
    vocab = fmodel.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prefill = [int(x) for x in a.prefill.split(",") if x]
    batches = [int(x) for x in a.batches.split(",") if x]
    prompts = {f"prefill_{n}": torch.randint(0, vocab, (1, n), generator=g) for n in prefill}
    prompts.update({f"generate_b{b}": torch.randint(0, vocab, (b, a.prompt_len), generator=g) for b in batches})
    prompts.update({f"decode_b{b}": prompts[f"generate_b{b}"] for b in batches})
    if a.ppl_only:
        rows, prompts = {}, {}
    with torch.inference_mode():
        for r in rows.values():  # warm-up: kernel builds, weight repacking
            r["prefill"](prompts[next(iter(prompts))][:1, :32])
            r["generate"](prompts[next(iter(prompts))][:1, :8])
        raw = {name: {t: [] for t in prompts} for name in rows}
        for _ in range(a.repeats):
            for task, ids in prompts.items():
                kind = task.split("_")[0]
                for name, r in rows.items():
                    t0 = time.perf_counter()
                    timed = r[kind](ids)
                    dt = timed if kind == "decode" else time.perf_counter() - t0  # decode: its own timer
                    n = ids.numel() if kind == "prefill" else ids.shape[0] * a.new_tokens
                    raw[name][task].append(n / dt)
        ref = raw.get(f"{base} (transformers)")
        speed = {name: {t: {"tokens_per_s": statistics.median(v), "all": v,
                            "ratio_vs_baseline": statistics.median(v) / statistics.median(ref[t])}
                        for t, v in per.items()} for name, per in raw.items()}
    ppl = {}
    if a.ppl_windows:
        # every position's logits from the int8 head ("auto" hands a window's 2048 rows to the stored head)
        int8, stored = fptq.load(out, head="int8"), fptq.load(out, head="stored")
        reference = fptq.load(out, runtime="off", backend="reference")
        for data, path in (("wikitext2", wikitext_path()), ("c4", c4_eval_path())):
            windows = token_windows(tok, load_eval_text(str(path)), 2048, a.ppl_windows)
            r = {"runtime": evaluate_perplexity(int8, windows, desc=f"{data} int8 head")["ppl"],
                 "runtime_stored_head": evaluate_perplexity(stored, windows, desc=f"{data} stored head")["ppl"],
                 "modules": evaluate_perplexity(modules, windows, desc=f"{data} modules")["ppl"],
                 "modules_reference": evaluate_perplexity(reference, windows, desc=f"{data} reference")["ppl"]}
            ppl[data] = {**r, "relative_difference": r["runtime"] / r["modules"] - 1,
                         "stored_head_relative_difference": r["runtime_stored_head"] / r["modules"] - 1,
                         "reference_relative_difference": r["runtime_stored_head"] / r["modules_reference"] - 1,
                         "modules_vs_reference": r["modules"] / r["modules_reference"] - 1}
    res = {"meta": {"checkpoint": str(out), "float_model": str(src), "repeats": a.repeats, "baseline": base,
                    "head": fast.lm_head.product.kind,
                    "new_tokens": a.new_tokens, "prompt_len": a.prompt_len, **machine()},
           "speed": speed, "ppl": ppl, "command": "python bench/transformers_api.py " + " ".join(argv or sys.argv[1:])}
    tasks = list(prompts)
    title = "Speed and perplexity" if speed and ppl else "Speed" if speed else "Perplexity"
    md = [f"# {title} through the transformers API "
          f"({Path(str(src_dir)).name})", ""]
    if speed:
        md += [f"{machine()['threads']} threads, {a.repeats} interleaved repeats; tokens/s, median (ratio to {base}). "
               f"The runtime's output head: {res['meta']['head']}. "
               f"generate: {a.new_tokens} new tokens after a {a.prompt_len}-token prompt per sequence.", "",
               "| row | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for name, per in speed.items():
        md.append(f"| {name} | " + " | ".join(f"{per[t]['tokens_per_s']:.1f} ({per[t]['ratio_vs_baseline']:.2f}x)"
                                              for t in tasks) + " |")
    md.append("")
    if ppl:
        md += [f"Perplexity, {a.ppl_windows} windows of 2048 tokens each, fptq.load (runtime, int8 head on every "
               "position) and with the stored head, against fptq.load (modules, what `fptq eval` runs): " + "; ".join(
                   f"{d} {p['runtime']:.3f} / {p['runtime_stored_head']:.3f} vs {p['modules']:.3f} "
                   f"({100 * p['relative_difference']:+.2f}% / {100 * p['stored_head_relative_difference']:+.2f}%)"
                   for d, p in ppl.items()) + ".", "",
               "Against the modules with the reference backend (float32 simulation of the same quantizers), the stored "
               "head's runtime and the modules path (kernels) differ by: " + "; ".join(
                   f"{d} {p['modules_reference']:.3f}: runtime {100 * p['reference_relative_difference']:+.2f}%, modules "
                   f"{100 * p['modules_vs_reference']:+.2f}%" for d, p in ppl.items()) + ".", ""]
    md.append(f"Command: `{res['command']}`")
    write_results(a.name, res, "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
