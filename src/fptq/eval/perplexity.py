"""Perplexity the GPTQ way, plus fidelity to a reference (float) model.

The whole text is tokenized once and cut into non-overlapping windows of
``seqlen`` tokens (the tail that does not fill a window is dropped); the
perplexity is ``exp`` of the mean next-token negative log-likelihood over all
predicted tokens of all windows (equal-length windows, so this is the mean of
the per-window means). With a reference model, the same windows also give the
mean KL divergence ``KL(reference || model)`` of the next-token distributions
and the top-1 agreement, as llama.cpp's ``perplexity --kl-divergence`` does.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data import read_text
from ..errors import FptqError

__all__ = ["load_eval_text", "token_windows", "evaluate_perplexity", "EVAL_TEXT_CONVENTIONS"]

EVAL_TEXT_CONVENTIONS = {
    "wikitext2": "lines of wikitext2_test.raw joined with '\\n\\n' (GPTQ convention)",
    "c4": "documents 0-999 of c4_validation_2k.jsonl (the evaluation split) joined with ' '",
}


def load_eval_text(path: str | Path, name: str | None = None) -> str:
    """Text of an evaluation file with the conventions above.

    ``.raw``/``.txt``: lines joined with ``"\\n\\n"`` (GPTQ's WikiText-2
    convention). ``.jsonl``: the ``text`` fields of the first 1000 rows joined
    with a space (GPTQ's C4 convention; our C4 copy keeps rows 0-999 for
    evaluation).
    """
    p = Path(path)
    if p.suffix == ".jsonl":
        import json

        read_text(p)  # validates the file (exists, text, JSON lines with a text field)
        rows = [json.loads(line)["text"] for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
        return " ".join(rows[:1000])
    text = read_text(p)
    return "\n\n".join(text.splitlines())


def token_windows(tokenizer, text: str, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    n = ids.numel() // seqlen
    if n == 0:
        raise FptqError(f"the evaluation text has {ids.numel()} tokens, fewer than --seqlen {seqlen}")
    if max_windows is not None:
        if max_windows < 1:
            raise FptqError(f"max_windows must be at least 1, got {max_windows}")
        n = min(n, max_windows)
    return ids[: n * seqlen].view(n, seqlen)


def divergence_sums(logp: torch.Tensor, ref_logp: torch.Tensor, rows: int = 64) -> tuple[float, int]:
    """``(sum over positions of KL(ref || p), positions where both argmaxes agree)`` for ``[T, vocab]``
    log-probabilities; the reference may be float16. Computed ``rows`` positions at a time, each block
    fused (``kl_div``): with a 150k-token vocabulary a whole window's temporaries are gigabytes."""
    kl, agree = 0.0, 0
    for a in range(0, logp.shape[0], rows):
        lp, ref = logp[a: a + rows], ref_logp[a: a + rows].float()
        kl += float(F.kl_div(lp, ref, reduction="sum", log_target=True))
        agree += int((ref.argmax(-1) == lp.argmax(-1)).sum())
    return kl, agree


@torch.inference_mode()
def evaluate_perplexity(
    model,
    windows: torch.Tensor,
    reference=None,
    device: str | torch.device | None = None,
    progress: bool = True,
    desc: str = "ppl",
    reference_logprobs: list[torch.Tensor] | None = None,
    keep_logprobs: list | None = None,
) -> dict[str, float]:
    """``{"ppl", "nll", "tokens", "windows"}`` (+ ``"kld"``, ``"top1"`` with a reference).

    The reference is a model, or ``reference_logprobs``: the reference's
    next-token log-probabilities per window, kept in float16 (as collected by passing a
    list as ``keep_logprobs`` when evaluating the reference), which saves one
    forward per window when several models are compared against one reference.
    """
    if windows.dim() != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise FptqError(f"evaluate_perplexity needs windows of token ids [N >= 1, seqlen >= 2], got shape "
                        f"{tuple(windows.shape)} (token_windows makes them)")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    nll_sum, count = 0.0, 0
    kld_sum, top1_sum = 0.0, 0
    it = range(windows.shape[0])
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=desc, unit="window", leave=False)
    for i in it:
        ids = windows[i: i + 1].to(device)
        logits = model(ids).logits[0, :-1].float()
        target = ids[0, 1:]
        logp = F.log_softmax(logits, dim=-1)
        nll_sum += float(-logp.gather(1, target[:, None]).sum())
        count += target.numel()
        if keep_logprobs is not None:  # float16 halves the memory; its error on KL terms is ~1e-4 relative
            keep_logprobs.append(logp.to(torch.float16).cpu())
        ref_logp = None
        if reference_logprobs is not None:
            ref_logp = reference_logprobs[i].to(logp.device)
        elif reference is not None:
            ref_logp = F.log_softmax(reference(ids).logits[0, :-1].float(), dim=-1)
        if ref_logp is not None:
            kl, agree = divergence_sums(logp, ref_logp)
            kld_sum += kl
            top1_sum += agree
    nll = nll_sum / count
    out = {"ppl": math.exp(nll), "nll": nll, "tokens": count, "windows": int(windows.shape[0])}
    if reference is not None or reference_logprobs is not None:
        out["kld"] = kld_sum / count
        out["top1"] = top1_sum / count
    return out
