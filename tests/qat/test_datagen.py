"""Data-free generation: the recipe, determinism, the cache file."""
import json

import pytest
import torch

from fptq.errors import FptqError
from fptq.qat import GenerationRecipe, generate_data, load_or_generate
from fptq.qat.datagen import sample_next, sidecar_path

from ..conftest import make_tokenizer, tiny_llama


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=3)


def test_sample_next_inverse_cdf_topk_and_greedy():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]] * 4))
    greedy = torch.tensor([False, False, False, True])
    u = torch.tensor([0.05, 0.25, 0.95, 0.05], dtype=torch.float64)
    # cdf 0.1 0.3 0.6 1.0: u=0.05 -> 0, 0.25 -> 1, 0.95 -> 3; the greedy row takes the argmax
    assert sample_next(logits, greedy, u).tolist() == [0, 1, 3, 3]
    # top-2 keeps tokens 2 and 3 (renormalised 3/7, 4/7): u=0.25 -> 2, u=0.95 -> 3
    assert sample_next(logits, greedy, u, top_k=2).tolist() == [2, 2, 3, 3]


def test_sampling_follows_the_softmax():
    p = torch.tensor([0.5, 0.3, 0.2])
    u = torch.rand(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ids = sample_next(torch.log(p).expand(20000, 3), torch.zeros(20000, dtype=torch.bool), u)
    freq = torch.bincount(ids, minlength=3).float() / 20000
    assert torch.allclose(freq, p, atol=0.015)


def test_deterministic_for_a_seed_and_independent_of_batching(model):
    r = GenerationRecipe(length=24, seed=5)
    a = generate_data(model, 6, r, batch_size=4, progress=False)
    b = generate_data(model, 6, r, batch_size=6, progress=False)
    assert a.shape == (6, 24) and a.dtype == torch.long
    assert torch.equal(a, b)
    # the first n sequences of a larger run are the sequences of a smaller one
    assert torch.equal(generate_data(model, 3, r, batch_size=2, progress=False), a[:3])
    c = generate_data(model, 6, GenerationRecipe(length=24, seed=6), batch_size=4, progress=False)
    assert not torch.equal(a, c)
    assert len({tuple(s) for s in a[:, :8].tolist()}) == 6  # distinct sequences


def test_recipe_greedy_prefix_then_samples(model):
    r = GenerationRecipe(length=12, seed=0, greedy_lengths=(3, 5))
    excluded = list(range(0, 200))
    ids = generate_data(model, 4, r, exclude_ids=excluded, batch_size=4, progress=False)
    assert (ids[:, 0] >= 200).all()  # start tokens never drawn from the excluded (special) ids
    with torch.no_grad():
        logits = model(ids).logits
    argmax = logits.argmax(-1)  # argmax[:, p - 1] predicts token p
    for i, n in enumerate([3, 5, 3, 5]):
        assert torch.equal(ids[i, 1:n], argmax[i, : n - 1])  # tokens 1..n-1 are greedy
    # a fully greedy recipe is the model's argmax everywhere; the sampled one is not
    g = generate_data(model, 4, GenerationRecipe(length=12, greedy_lengths=(12,)), batch_size=4, progress=False)
    with torch.no_grad():
        assert torch.equal(g[:, 1:], model(g).logits.argmax(-1)[:, :-1])
    assert not torch.equal(ids[:, 5:], argmax[:, 4:-1])


def test_cache_reuse_extend_and_mismatch(model, tmp_path):
    tok = make_tokenizer()
    path = tmp_path / "gen.safetensors"
    r = GenerationRecipe(length=16, seed=1)
    a = load_or_generate(path, model, 4, r, tokenizer=tok, batch_size=2, progress=False)
    meta = json.loads(sidecar_path(path).read_text())
    assert sidecar_path(path).name == "gen.json"
    assert meta["num"] == 4 and meta["recipe"]["greedy_lengths"] == [3, 4, 5] and meta["model_fingerprint"]
    assert meta["excluded_start_ids"] == sorted(tok.all_special_ids)
    mtime = path.stat().st_mtime_ns

    # a second run reuses the file (no generation, no write)
    b = load_or_generate(path, model, 3, r, tokenizer=tok, progress=False)
    assert torch.equal(b, a[:3]) and path.stat().st_mtime_ns == mtime
    # more sequences: the file is extended with the same stream
    c = load_or_generate(path, model, 6, r, tokenizer=tok, batch_size=4, progress=False)
    assert torch.equal(c[:4], a) and json.loads(sidecar_path(path).read_text())["num"] == 6
    assert torch.equal(c, generate_data(model, 6, r, exclude_ids=tok.all_special_ids, progress=False))

    # another recipe or model: a clear error, replaced with force
    with pytest.raises(FptqError, match="another recipe.*--force"):
        load_or_generate(path, model, 2, GenerationRecipe(length=16, seed=2), tokenizer=tok, progress=False)
    with pytest.raises(FptqError, match="another model_fingerprint"):
        load_or_generate(path, tiny_llama(seed=4), 2, r, tokenizer=tok, progress=False)
    d = load_or_generate(path, model, 2, GenerationRecipe(length=16, seed=2), tokenizer=tok, force=True,
                         progress=False)
    assert d.shape == (2, 16) and json.loads(sidecar_path(path).read_text())["recipe"]["seed"] == 2


def test_bad_inputs(model, tmp_path):
    with pytest.raises(FptqError, match="at least 2 tokens"):
        GenerationRecipe(length=1)
    with pytest.raises(FptqError, match="greedy lengths"):
        GenerationRecipe(greedy_lengths=(0,))
    with pytest.raises(FptqError, match="--num"):
        generate_data(model, 0, GenerationRecipe(length=4), progress=False)
    other = tmp_path / "x.safetensors"
    other.write_bytes(b"not ours")
    with pytest.raises(FptqError, match="not an fptq generated-data file"):
        load_or_generate(other, model, 2, GenerationRecipe(length=4), progress=False)
