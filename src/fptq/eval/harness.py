"""Optional bridge to EleutherAI lm-evaluation-harness (``pip install 'fptq[lm-eval]'``)."""

from __future__ import annotations

from typing import Any, Sequence

__all__ = ["run_lm_eval"]


def run_lm_eval(
    model,
    tokenizer,
    tasks: str | Sequence[str],
    *,
    batch_size: int | str = 16,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    device: str | None = None,
    max_length: int | None = None,
    task_manager: Any = None,
    include_path: str | None = None,
    **kw: Any,
) -> dict[str, Any]:
    """Evaluate an in-memory Hugging Face causal LM with lm-evaluation-harness.

    Wraps ``lm_eval.models.huggingface.HFLM(pretrained=model, tokenizer=tokenizer)``
    and ``lm_eval.simple_evaluate``; returns its result dict (``results["results"]``
    holds the per-task metrics). ``include_path`` adds a folder of custom task
    YAMLs (e.g. tasks reading local files with ``dataset_path: json``). Other
    keyword arguments go to ``simple_evaluate``. Note that the harness's
    ``limit`` takes the *first* N documents, not a random subset.
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "run_lm_eval needs EleutherAI lm-evaluation-harness; install it with "
            "`pip install 'fptq[lm-eval]'` (or `pip install lm-eval`)"
        ) from e

    if isinstance(tasks, str):
        tasks = [tasks]
    lm_kw: dict[str, Any] = {"pretrained": model, "tokenizer": tokenizer, "batch_size": batch_size}
    if device is not None:
        lm_kw["device"] = device
    if max_length is not None:
        lm_kw["max_length"] = max_length
    lm = HFLM(**lm_kw)
    if task_manager is None and include_path is not None:
        from lm_eval.tasks import TaskManager

        task_manager = TaskManager(include_path=include_path)
    eval_kw: dict[str, Any] = dict(kw)
    if task_manager is not None:
        eval_kw["task_manager"] = task_manager
    return lm_eval.simple_evaluate(
        model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit, **eval_kw
    )
