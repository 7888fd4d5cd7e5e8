"""Evaluation: perplexity (+ KL divergence / top-1 agreement) and zero-shot multiple choice."""
from .perplexity import evaluate_perplexity, load_eval_text, token_windows
from .scorer import evaluate_task, evaluate_tasks, loglikelihoods
from .tasks import TASKS, Item, load_task

__all__ = ["evaluate_perplexity", "load_eval_text", "token_windows", "evaluate_task", "evaluate_tasks",
           "loglikelihoods", "TASKS", "Item", "load_task"]
