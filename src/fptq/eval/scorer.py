"""Log-likelihood scoring and zero-shot evaluation, following lm-evaluation-harness.

:func:`loglikelihoods` reproduces ``HFLM.loglikelihood`` (lm-eval 0.4.x) for
causal LMs:

* tokenization is the harness's ``_encode_pair``: trailing whitespace of the
  context is moved to the front of the continuation, ``context + continuation``
  is encoded as a whole and split after ``len(encode(context))`` tokens;
  ``encode`` uses the tokenizer's default special tokens (no extra BOS unless the
  tokenizer adds one), except when the text already starts with the BOS string.
  An empty context is replaced by the BOS (else EOS) token;
* the model input is ``(context + continuation)[-(max_length + 1):][:-1]`` (left
  truncation), right-padded in batches (a causal model never looks right, so no
  attention mask is needed), sorted by length, longest first;
* the result per request is ``(sum of log p(continuation tokens), is_greedy)``
  where ``is_greedy`` says the per-position argmax equals the continuation.

Requests whose model inputs are identical (e.g. the one-token " A".." D"
continuations of MMLU) share a single forward pass, like the harness's
``logits_cache``.

:func:`evaluate_task` turns those into ``acc`` / ``acc_norm`` (harness
definitions) with the harness's sample standard error.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from .tasks import (
    MMLU_CATEGORIES,
    MMLU_SUBJECT_CATEGORY,
    TASK_METRICS,
    Item,
    canonical_task_name,
    load_task,
)

__all__ = [
    "loglikelihoods",
    "encode_pair",
    "resolve_max_length",
    "evaluate_task",
    "evaluate_tasks",
    "evaluate_items",
    "select_subset",
    "mean_stderr",
]

DEFAULT_MAX_LENGTH = 2048
_TOKENIZER_INFINITY = 1000000000000000019884624838656


# --------------------------------------------------------------------------- tokenization


def _prefix_token_id(tokenizer) -> int:
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos if bos is not None else tokenizer.eos_token_id


def _prefix_text(tokenizer) -> str:
    prefix = _prefix_token_id(tokenizer)
    return tokenizer.decode([prefix]) if prefix is not None else ""


def _tok_encode(
    tokenizer, text: str, add_special_tokens: bool | None = None, prefix_text: str | None = None
) -> list[int]:
    kwargs: dict[str, Any] = {}
    if add_special_tokens is not None:
        kwargs["add_special_tokens"] = add_special_tokens
    else:
        # like the harness: no special tokens if the text already starts with the prefix (BOS/EOS) token
        bos_text = _prefix_text(tokenizer) if prefix_text is None else prefix_text
        if bos_text and text.startswith(bos_text):
            kwargs["add_special_tokens"] = False
    return list(tokenizer.encode(text, **kwargs))


def encode_pair(
    tokenizer,
    context: str,
    continuation: str,
    add_special_tokens: bool | None = None,
    *,
    _prefix_text_cache: str | None = None,
    _ctx_cache: dict | None = None,
) -> tuple[list[int], list[int]]:
    """Token ids ``(context_enc, continuation_enc)`` exactly as the harness makes them."""
    if context == "":
        cont = _tok_encode(tokenizer, continuation, add_special_tokens=False)
        prefix = _prefix_token_id(tokenizer)
        if cont and cont[0] == prefix:
            return cont[:1], cont[1:]
        return [prefix], cont
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = _tok_encode(tokenizer, context + continuation, add_special_tokens, _prefix_text_cache)
    if _ctx_cache is not None and context in _ctx_cache:
        ctx = _ctx_cache[context]
    else:
        ctx = _tok_encode(tokenizer, context, add_special_tokens, _prefix_text_cache)
        if _ctx_cache is not None:
            _ctx_cache[context] = ctx
    return ctx, whole[len(ctx):]


def resolve_max_length(model, tokenizer=None, default: int = DEFAULT_MAX_LENGTH) -> int:
    """Context length: config ``n_positions`` / ``max_position_embeddings`` / ``n_ctx``,
    else the tokenizer's ``model_max_length`` (if set), else ``default`` (harness order)."""
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        v = getattr(cfg, attr, None) if cfg is not None else None
        if v is not None:
            return int(v)
    mml = getattr(tokenizer, "model_max_length", None)
    if mml is not None and mml != _TOKENIZER_INFINITY and mml < 10**12:
        return int(mml)
    return default


# --------------------------------------------------------------------------- scoring


def _model_device(model) -> torch.device:
    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device):
        return dev
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError, TypeError):
        return torch.device("cpu")


def _logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids)
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def loglikelihoods(
    model,
    tokenizer,
    requests: Sequence[tuple[str, str]],
    batch_size: int = 16,
    progress: bool = True,
    *,
    max_length: int | None = None,
    max_batch_tokens: int = 4096,
    add_special_tokens: bool | None = None,
) -> list[tuple[float, bool]]:
    """Score ``(context, continuation)`` pairs: ``[(sum log p(cont | ctx), is_greedy), ...]``.

    ``model(input_ids)`` must return logits (an object with ``.logits``, a tuple
    whose first element is the logits, or the tensor itself) of shape
    ``[batch, seq, vocab]``. Batches hold at most ``batch_size`` sequences and at
    most ``max_batch_tokens`` padded tokens (a longer single sequence runs alone),
    which bounds the ``batch x seq x vocab`` logits memory. ``max_length`` defaults
    to :func:`resolve_max_length`.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    if max_length is None:
        max_length = resolve_max_length(model, tokenizer)

    # 1. tokenize; map each request to its model input (shared between requests).
    inputs: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
    prefix_text = _prefix_text(tokenizer)
    ctx_cache: dict[str, list[int]] = {}
    for idx, (context, continuation) in enumerate(requests):
        ctx_enc, cont_enc = encode_pair(
            tokenizer, context, continuation, add_special_tokens,
            _prefix_text_cache=prefix_text, _ctx_cache=ctx_cache,
        )
        if len(cont_enc) == 0:
            raise ValueError(f"request {idx}: continuation {continuation!r} encodes to no tokens")
        if len(cont_enc) > max_length:
            raise ValueError(f"request {idx}: continuation longer than max_length={max_length} tokens")
        inp = tuple((ctx_enc + cont_enc)[-(max_length + 1):][:-1])
        inputs.setdefault(inp, []).append((idx, cont_enc))

    # 2. longest first (like the harness); ties broken by the tokens for determinism.
    order = sorted(inputs, key=lambda t: (-len(t), t))
    batches: list[list[tuple[int, ...]]] = []
    cur: list[tuple[int, ...]] = []
    for inp in order:
        # sorted descending, so the first sequence of a batch sets its padded length.
        if cur and (len(cur) >= batch_size or (len(cur) + 1) * len(cur[0]) > max_batch_tokens):
            batches.append(cur)
            cur = []
        cur.append(inp)
    if cur:
        batches.append(cur)

    results: list[tuple[float, bool] | None] = [None] * len(requests)
    device = _model_device(model)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    pbar = None
    if progress:
        from tqdm.auto import tqdm

        pbar = tqdm(total=len(requests), desc="loglikelihood", leave=False)
    try:
        with torch.inference_mode():
            for batch in batches:
                pad_len = len(batch[0])
                ids = torch.zeros((len(batch), pad_len), dtype=torch.long)
                for r, inp in enumerate(batch):
                    ids[r, : len(inp)] = torch.tensor(inp, dtype=torch.long)
                logits = _logits(model, ids.to(device))
                for r, inp in enumerate(batch):
                    reqs = inputs[inp]
                    inplen = len(inp)
                    maxcont = max(len(c) for _, c in reqs)
                    sl = logits[r, inplen - maxcont : inplen].float().log_softmax(dim=-1)
                    greedy = sl.argmax(dim=-1)
                    for idx, cont in reqs:
                        n = len(cont)
                        tgt = torch.tensor(cont, dtype=torch.long, device=sl.device)
                        lp = sl[-n:].gather(1, tgt[:, None]).sum()
                        results[idx] = (float(lp), bool((greedy[-n:] == tgt).all()))
                    if pbar is not None:
                        pbar.update(len(reqs))
                del logits
    finally:
        if pbar is not None:
            pbar.close()
        if was_training and hasattr(model, "train"):
            model.train()
    return results  # type: ignore[return-value]


# --------------------------------------------------------------------------- metrics


def mean_stderr(values: Sequence[float]) -> float:
    """The harness's ``mean_stderr``: sample std (n-1) / sqrt(n); nan for n < 2."""
    n = len(values)
    if n < 2:
        return float("nan")
    mu = sum(values) / n
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (n - 1)) / math.sqrt(n)


def _argmax(xs: Sequence[float]) -> int:
    # first maximum, like np.argmax
    best = 0
    for i, x in enumerate(xs):
        if x > xs[best]:
            best = i
    return best


def select_subset(n: int, limit: int | None, seed: int = 0) -> list[int]:
    """Indices of a seeded random subset of ``limit`` of ``n`` items, in file order."""
    if limit is None or limit >= n:
        return list(range(n))
    if limit < 0:
        raise ValueError("limit must be >= 0")
    return sorted(random.Random(seed).sample(range(n), limit))


def evaluate_items(
    model,
    tokenizer,
    items: Sequence[Item],
    *,
    metrics: Iterable[str] = ("acc", "acc_norm"),
    batch_size: int = 16,
    progress: bool = True,
    return_items: bool = False,
    **score_kw,
) -> dict[str, Any]:
    """Score a list of items; ``acc`` (+ ``acc_norm``, ``perplexity`` if in ``metrics``)."""
    metrics = tuple(metrics)
    reqs: list[tuple[str, str]] = []
    for it in items:
        reqs.extend(it.requests())
    scored = loglikelihoods(model, tokenizer, reqs, batch_size=batch_size, progress=progress, **score_kw)
    acc: list[float] = []
    acc_norm: list[float] = []
    lls_gold: list[float] = []
    per_item = []
    pos = 0
    for it in items:
        res = scored[pos : pos + len(it.choices)]
        pos += len(it.choices)
        lls = [r[0] for r in res]
        if len(it.choices) == 1:  # loglikelihood task (lambada): acc = is_greedy
            pred = 0 if res[0][1] else -1
            pred_norm = pred
            correct = float(res[0][1])
            correct_norm = correct
            lls_gold.append(lls[0])
        else:
            pred = _argmax(lls)
            pred_norm = _argmax([ll / float(len(c)) for ll, c in zip(lls, it.choices)])
            correct = float(pred == it.gold)
            correct_norm = float(pred_norm == it.gold)
        acc.append(correct)
        acc_norm.append(correct_norm)
        if return_items:
            per_item.append(
                {
                    "doc_id": it.doc_id,
                    "subject": it.subject,
                    "gold": it.gold,
                    "lls": lls,
                    "is_greedy": [r[1] for r in res],
                    "pred": pred,
                    "pred_norm": pred_norm,
                    "acc": correct,
                    "acc_norm": correct_norm,
                }
            )
    n = len(items)
    out: dict[str, Any] = {"n": n}
    out["acc"] = sum(acc) / n if n else float("nan")
    out["acc_stderr"] = mean_stderr(acc)
    out["stderr"] = out["acc_stderr"]
    if "acc_norm" in metrics:
        out["acc_norm"] = sum(acc_norm) / n if n else float("nan")
        out["acc_norm_stderr"] = mean_stderr(acc_norm)
    if "perplexity" in metrics and lls_gold:
        out["perplexity"] = math.exp(-sum(lls_gold) / len(lls_gold))
    if return_items:
        out["items"] = per_item
        out["_correct"] = acc
    return out


def evaluate_task(
    model,
    tokenizer,
    name: str,
    data_dir: str | Path,
    limit: int | None = None,
    seed: int = 0,
    batch_size: int = 16,
    num_fewshot: int = 0,
    *,
    progress: bool = True,
    return_items: bool = False,
    subjects: Sequence[str] | None = None,
    **score_kw,
) -> dict[str, Any]:
    """Evaluate one task; returns a metrics dict.

    Keys: ``task``, ``acc``, ``acc_stderr`` (= ``stderr``, the harness's sample
    standard error of the mean), ``acc_norm`` + ``acc_norm_stderr`` (only piqa,
    hellaswag, arc_easy, arc_challenge, as in the harness), ``perplexity``
    (lambada), ``n`` (items scored), ``n_total`` (items in the file),
    ``limit``, ``seed``, ``subset`` (a description: all items, or a seeded random
    subset), ``num_fewshot``.

    ``limit``: score a seeded random subset of ``limit`` items (file order kept);
    for MMLU the limit applies per subject, as the harness's ``--limit`` does.

    MMLU adds ``subjects`` (per-subject ``acc``/``stderr``/``n``), ``groups``
    (humanities / stem / social_sciences / other) and ``acc_subject_avg``. As in
    the harness, ``acc`` of mmlu and of each group is the item-weighted mean
    (``weight_by_size``); ``acc_subject_avg`` is the unweighted mean over subjects.
    Group/overall stderr is the sample standard error over their items (the
    harness pools subject variances instead; the numbers are close).

    ``return_items=True`` adds per-item records under ``items``.
    """
    key = canonical_task_name(name)
    load_kw = {"subjects": subjects} if (key == "mmlu" and subjects is not None) else {}
    all_items = load_task(key, data_dir, num_fewshot=num_fewshot, **load_kw)
    metrics = TASK_METRICS[key]

    if key == "mmlu":
        by_subj: dict[str, list[Item]] = {}
        for it in all_items:
            by_subj.setdefault(it.subject or "", []).append(it)
        items: list[Item] = []
        for s, its in by_subj.items():
            items.extend(its[i] for i in select_subset(len(its), limit, seed))
    else:
        items = [all_items[i] for i in select_subset(len(all_items), limit, seed)]

    res = evaluate_items(
        model, tokenizer, items, metrics=metrics, batch_size=batch_size, progress=progress,
        return_items=True, **score_kw,
    )
    correct = res.pop("_correct")
    per_item = res.pop("items")
    out: dict[str, Any] = {"task": key, **res}
    out["n_total"] = len(all_items)
    out["limit"] = limit
    out["seed"] = seed
    out["num_fewshot"] = num_fewshot
    if len(items) < len(all_items):
        scope = " per subject" if key == "mmlu" else ""
        out["subset"] = f"random subset of {limit} items{scope} (seed {seed}): {len(items)} of {len(all_items)}"
    else:
        out["subset"] = f"all {len(all_items)} items"

    if key == "mmlu":
        subj_stats: dict[str, dict[str, Any]] = {}
        group_correct: dict[str, list[float]] = {g: [] for g in MMLU_CATEGORIES}
        group_subj_acc: dict[str, list[float]] = {g: [] for g in MMLU_CATEGORIES}
        subj_correct: dict[str, list[float]] = {}
        for it, c in zip(items, correct):
            subj_correct.setdefault(it.subject or "", []).append(c)
        for s, cs in subj_correct.items():
            a = sum(cs) / len(cs)
            g = MMLU_SUBJECT_CATEGORY.get(s, "other")
            subj_stats[s] = {"acc": a, "stderr": mean_stderr(cs), "n": len(cs), "group": g}
            group_correct.setdefault(g, []).extend(cs)
            group_subj_acc.setdefault(g, []).append(a)
        out["subjects"] = subj_stats
        out["groups"] = {
            g: {
                "acc": sum(cs) / len(cs),
                "stderr": mean_stderr(cs),
                "n": len(cs),
                "n_subjects": len(group_subj_acc[g]),
                "acc_subject_avg": sum(group_subj_acc[g]) / len(group_subj_acc[g]),
            }
            for g, cs in group_correct.items()
            if cs
        }
        out["acc_subject_avg"] = sum(v["acc"] for v in subj_stats.values()) / max(len(subj_stats), 1)
    if return_items:
        out["items"] = per_item
    return out


def evaluate_tasks(
    model,
    tokenizer,
    names: Sequence[str],
    data_dir: str | Path,
    progress: bool = True,
    **kw,
) -> dict[str, dict[str, Any]]:
    """:func:`evaluate_task` for each name (same keyword arguments); ``{name: metrics}``."""
    from tqdm.auto import tqdm

    out: dict[str, dict[str, Any]] = {}
    bar = tqdm(list(names), desc="tasks", disable=not progress)
    for name in bar:
        bar.set_postfix_str(name)
        out[name] = evaluate_task(model, tokenizer, name, data_dir, progress=progress, **kw)
    return out
