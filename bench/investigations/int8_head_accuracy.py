"""What an int8 output head costs in perplexity, and why its activations take two int8 terms.

The question behind the runtime's int8 head (``src/fptq/runtime/head.py``): if a quantized model's ``lm_head``
is requantized to int8 (symmetric, groups of 64 inputs, codes within +-119 so that two 4-bit planes hold them)
and its input rows to int8 per token, how much perplexity is lost, and where? Each variant replaces the head
of ``fptq.load(CKPT, runtime="off")`` (the modules path ``fptq eval`` runs) by a float simulation:

* ``w8``: int8 weights, float activations;
* ``w8_a8x2``: int8 weights, each row as two int8 terms (the row and its residual), what the runtime computes;
* ``w8_a8``: int8 weights, one int8 term per row (per-token absmax);
* ``w4g32_a8x2``: 4-bit weights in groups of 32 (for scale), two-term activations.

Perplexity on the first ``--windows`` WikiText-2 windows of 2048 tokens, with the KL divergence and top-1
agreement against the checkpoint's own head. Writes bench/results/NAME.{json,md}.

    python bench/investigations/int8_head_accuracy.py --checkpoint CKPT --windows 8 --name int8_head_smollm2
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: common.py
from common import wikitext_path, write_results  # noqa: E402


class SimulatedHead(nn.Module):
    def __init__(self, weight: torch.Tensor, terms: int):
        super().__init__()
        self.weight, self.terms = weight, terms

    def forward(self, x):
        from fptq.quant.planes import two_term_per_token

        x = x.float()
        if self.terms:
            q, s = two_term_per_token(x.reshape(-1, x.shape[-1]))
            x = (q.float() * s)[: self.terms].sum(0).view_as(x)
        return F.linear(x, self.weight)


def simulated_weight(w: torch.Tensor, group: int, qmax: int) -> torch.Tensor:
    from fptq.quant.planes import int8_group_quantize

    q, s = int8_group_quantize(w, group, qmax)
    return q.float() * s.float().repeat_interleave(group, 1)[:, : w.shape[1]]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--name", default="int8_head")
    a = p.parse_args(argv)
    import fptq
    from transformers import AutoTokenizer

    from fptq.eval.perplexity import evaluate_perplexity, load_eval_text, token_windows

    model = fptq.load(a.checkpoint, runtime="off")
    tok = AutoTokenizer.from_pretrained(a.checkpoint)
    windows = token_windows(tok, load_eval_text(str(wikitext_path())), 2048, a.windows)
    w = model.lm_head.weight.detach().float()
    ref: list = []
    res = {"stored": evaluate_perplexity(model, windows, keep_logprobs=ref, desc="stored head")}
    variants = {"w8": (64, 119, 0), "w8_a8x2": (64, 119, 2), "w8_a8": (64, 119, 1), "w4g32_a8x2": (32, 7, 2)}
    for name, (group, qmax, terms) in variants.items():
        model.lm_head = SimulatedHead(simulated_weight(w, group, qmax), terms)
        r = evaluate_perplexity(model, windows, reference_logprobs=ref, desc=name)
        r["ppl_change"] = r["ppl"] / res["stored"]["ppl"] - 1
        res[name] = r
    out = {"checkpoint": a.checkpoint, "windows": a.windows, "results": res,
           "command": "python bench/investigations/int8_head_accuracy.py " + " ".join(argv or sys.argv[1:])}
    md = [f"# The output head in int8: {a.checkpoint}, {a.windows} WikiText-2 windows of 2048", "",
          "| head | ppl | change | KLD to the stored head | top-1 agreement |", "|---|---|---|---|---|"]
    for name, r in res.items():
        md.append(f"| {name} | {r['ppl']:.3f} | {100 * r.get('ppl_change', 0):+.2f}% | {r.get('kld', 0):.5f} | "
                  f"{100 * r.get('top1', 1):.2f}% |")
    md += ["", f"Command: `{out['command']}`"]
    write_results(a.name, out, "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
