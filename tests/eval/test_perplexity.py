"""evaluate_perplexity: perplexity, KL divergence and top-1 agreement against a float64 reference."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from fptq.errors import FptqError
from fptq.eval.perplexity import evaluate_perplexity, token_windows


class _Logits(torch.nn.Module):
    """A 'model' returning fixed logits for any input: [1, seqlen, vocab]."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # evaluate_perplexity reads the device from it

    def forward(self, ids):
        i = int(ids[0, 0])
        return type("Out", (), {"logits": self.logits[i: i + 1]})()


def test_metrics_match_float64_formulas():
    g = torch.Generator().manual_seed(0)
    n, seq, vocab = 3, 17, 50
    windows = torch.randint(0, vocab, (n, seq), generator=g)
    windows[:, 0] = torch.arange(n)  # the fake model picks its logits by the first token
    logits = 3 * torch.randn(n, seq, vocab, generator=g)
    ref_logits = logits + 0.7 * torch.randn(n, seq, vocab, generator=g)
    keep: list[torch.Tensor] = []
    evaluate_perplexity(_Logits(ref_logits), windows, keep_logprobs=keep, progress=False)
    r = evaluate_perplexity(_Logits(logits), windows, reference_logprobs=keep, progress=False)

    lp = F.log_softmax(logits[:, :-1].double(), -1)
    ref = torch.stack(keep).double()  # the float16 reference as stored
    nll = -lp.gather(-1, windows[:, 1:, None]).mean()
    kld = (ref.exp() * (ref - lp)).sum(-1).mean()
    top1 = (ref.argmax(-1) == logits[:, :-1].argmax(-1)).double().mean()
    assert r["tokens"] == n * (seq - 1) and r["windows"] == n
    assert math.isclose(r["ppl"], float(nll.exp()), rel_tol=1e-5)
    assert math.isclose(r["kld"], float(kld), rel_tol=1e-4)
    assert r["top1"] == float(top1)
    assert r["kld"] > 0.01  # the two models differ


def test_identical_model_has_zero_divergence():
    g = torch.Generator().manual_seed(1)
    windows = torch.randint(0, 40, (2, 9), generator=g)
    windows[:, 0] = torch.arange(2)
    logits = torch.randn(2, 9, 40, generator=g)
    m = _Logits(logits)
    r = evaluate_perplexity(m, windows, reference=m, progress=False)
    assert abs(r["kld"]) < 1e-6 and r["top1"] == 1.0


def test_runs_without_autograd():
    """Evaluation never records a graph, even for a model whose parameters require grad."""
    g = torch.Generator().manual_seed(2)
    windows = torch.randint(0, 30, (2, 6), generator=g)
    windows[:, 0] = torch.arange(2)
    m = _Logits(torch.nn.Parameter(torch.randn(2, 6, 30, generator=g)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Converting a tensor with requires_grad=True to a scalar"
        r = evaluate_perplexity(m, windows, reference=m, progress=False)
    assert r["ppl"] > 1


def test_no_windows_is_a_clear_error_not_a_division_by_zero():
    """Zero windows (or windows of one token: nothing to predict) are refused with the shape and the fix."""
    m = _Logits(torch.randn(1, 4, 10))
    for bad in (torch.zeros(0, 8, dtype=torch.long), torch.zeros(3, 1, dtype=torch.long)):
        with pytest.raises(FptqError, match=r"needs windows of token ids \[N >= 1, seqlen >= 2\]"):
            evaluate_perplexity(m, bad, progress=False)


def test_token_windows_refuses_a_window_count_below_one():
    class Tok:
        def __call__(self, text, return_tensors, add_special_tokens):
            return type("Enc", (), {"input_ids": torch.arange(100)[None]})()

    assert token_windows(Tok(), "text", 10, 3).shape == (3, 10)
    with pytest.raises(FptqError, match="max_windows must be at least 1, got 0"):
        token_windows(Tok(), "text", 10, 0)
