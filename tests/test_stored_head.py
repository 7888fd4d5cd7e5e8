"""A tied model's head stored as its embedding times one matrix (fptq.stored_head): a rotated run of a model
with tied embeddings writes no second [vocab, hidden] matrix, and every reader (fptq.load, transformers'
from_pretrained, both exports) computes the head the in-memory model has."""
from __future__ import annotations

import json

import pytest
import torch

import fptq
from fptq.errors import FptqError
from fptq.io import weight_files
from fptq.quant.hadamard import random_hadamard
from fptq.st import read_header
from fptq.stored_head import head_from_embedding, head_transform

from .conftest import as_stored, make_tokenizer, sqnr_db, tiny_llama
from .test_residual import _ids

SETTINGS = dict(nsamples=4, seqlen=32, device="cpu", progress=False)
CFG = dict(group_size=32, thresholds=(2.0, 20.0))  # the fptq method: rotation "residual+heads", residual_order "max"


def test_embedding_times_the_transform_is_the_turned_head():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(50, 48, generator=g, dtype=torch.float64)
    w = torch.rand(48, generator=g, dtype=torch.float64) * 3 + 0.1
    r = random_hadamard(48, seed=3)
    t = head_transform(r, w)
    torch.testing.assert_close((emb @ r) @ t, (emb * w) @ r, rtol=1e-12, atol=1e-12)
    got = head_from_embedding((emb @ r).to(torch.bfloat16), t.float())
    assert got.dtype == torch.bfloat16  # the embedding's dtype
    assert sqnr_db(((emb * w) @ r).float(), got.float()) > 40
    with pytest.raises(FptqError, match="does not fit the embedding"):
        head_from_embedding(emb, t[:-1])


def _saved_tied(tmp_path):
    """A tied LLaMA with norm weights far from one (so the head differs from the embedding once turned)."""
    model = tiny_llama(num_hidden_layers=3, tie_word_embeddings=True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=g) * 2 + 0.2)
    d = tmp_path / "m"
    model.save_pretrained(d, max_shard_size="60KB")
    make_tokenizer().save_pretrained(d)
    return d


def _names(out) -> set[str]:
    return {k for f in weight_files(out) for k in read_header(out / f)[0] if k != "__metadata__"}


@pytest.fixture(scope="module")
def tied_run(tmp_path_factory):
    """A rotated layer-by-layer run of a tied model, and the same model quantized by the in-memory API."""
    from fptq.workflow import quantize_to_dir

    from .conftest import _TEXT

    tmp = tmp_path_factory.mktemp("stored_head")
    calib = tmp / "calib.txt"
    calib.write_text(_TEXT * 3)
    d = _saved_tied(tmp)
    out = tmp / "q"
    _, report = quantize_to_dir(str(d), out, fptq.method_config("fptq", **CFG), calib=str(calib), **SETTINGS)
    model, tok, _ = fptq.load_float_model(str(d))
    windows = fptq.calibration_windows(tok, fptq.read_text(str(calib)), 4, 32, 0)
    model.fptq_plan = fptq.quantize(model, fptq.method_config("fptq", **CFG), windows, device="cpu", progress=False)
    return tmp, out, report, model


def test_rotated_tied_checkpoint_stores_the_transform_not_a_second_head(tied_run):
    tmp, out, report, model = tied_run
    names = _names(out)
    assert "lm_head.weight" not in names and "lm_head.embedding_transform" in names
    header = {k: v for f in weight_files(out) for k, v in read_header(out / f)[0].items()}
    h = model.config.hidden_size
    assert header["lm_head.embedding_transform"]["dtype"] == "F32"
    assert header["lm_head.embedding_transform"]["shape"] == [h, h]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True  # what a loader that knows nothing of the transform would do
    assert cfg["quantization_config"]["format_version"] == 2
    assert cfg["quantization_config"]["head_from_embedding"] == {
        "head": "lm_head.weight", "embedding": "model.embed_tokens.weight", "transform": "lm_head.embedding_transform"}


def test_loaded_head_is_the_in_memory_models(tied_run):
    """fptq.load computes the head from the stored embedding: the in-memory model's head within bfloat16
    rounding, and the logits of the in-memory API's model as stored."""
    _, out, _, model = tied_run
    loaded = fptq.load(out, backend="reference")
    assert loaded.config.tie_word_embeddings is False
    assert loaded.lm_head.weight.data_ptr() != loaded.model.embed_tokens.weight.data_ptr()
    ref = as_stored(model)
    assert not torch.allclose(ref.lm_head.weight, ref.model.embed_tokens.weight)  # a real transform
    assert sqnr_db(ref.lm_head.weight, loaded.lm_head.weight) > 40
    ids = _ids(2, 16, seed=2)
    with torch.no_grad():
        assert sqnr_db(ref(ids).logits, loaded(ids).logits) > 40


def test_from_pretrained_unties_the_stored_head(tied_run):
    from transformers import AutoModelForCausalLM

    _, out, _, _ = tied_run
    ref = fptq.load(out)
    hf = AutoModelForCausalLM.from_pretrained(out)
    assert hf.config.tie_word_embeddings is False
    assert hf.lm_head.weight is not hf.model.embed_tokens.weight
    assert not hasattr(hf.lm_head, "embedding_transform")
    sd_ref, sd_hf = ref.state_dict(), hf.state_dict()
    assert sd_ref.keys() == sd_hf.keys()
    for k in sd_ref:
        assert sd_hf[k].dtype == sd_ref[k].dtype and torch.equal(sd_hf[k], sd_ref[k]), k
    ids = _ids(2, 16, seed=2)
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, ref(ids).logits)


def test_exports_write_the_computed_head(tied_run):
    from fptq.export import export
    from fptq.st import WeightIndex

    tmp, out, _, _ = tied_run
    head = fptq.load(out, backend="reference", dtype=torch.bfloat16).lm_head.weight
    ct = export(out, tmp / "ct", "compressed-tensors")
    assert json.loads((ct / "config.json").read_text())["tie_word_embeddings"] is False
    index = WeightIndex(ct)
    assert "lm_head.embedding_transform" not in index.weight_map
    (_, got), = index.load("lm_head.").items()
    assert torch.equal(got, head)
    gguf = pytest.importorskip("gguf")
    path = export(out, tmp / "model.gguf", "gguf", embeddings="bf16", progress=False)
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    assert "output.weight" in tensors and not any("transform" in n for n in tensors)
    from gguf.quants import dequantize

    back = dequantize(tensors["output.weight"].data, tensors["output.weight"].tensor_type)
    assert torch.equal(torch.from_numpy(back.reshape(head.shape).copy()), head.float())


def test_damaged_or_newer_stored_head_checkpoints_are_refused(tied_run, tmp_path):
    import shutil

    _, out, _, _ = tied_run
    newer = tmp_path / "newer"
    shutil.copytree(out, newer)
    cfg = json.loads((newer / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 3
    (newer / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FptqError, match="format 3, newer than this fptq reads"):
        fptq.load(newer, verify=False)
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["head_from_embedding"]["transform"] = "lm_head.missing"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FptqError, match="lacks lm_head.missing, which its head is computed from"):
        fptq.load(bad, verify=False)


def test_in_memory_api_saves_the_same_checkpoint_tensors(tied_run, tmp_path):
    """``fptq.save`` of a tied model rotated and quantized in memory writes the transform too (the model carries
    it as a buffer of its head), the same tensors as the layer-by-layer run."""
    from fptq.st import WeightIndex

    _, out, _, model = tied_run
    assert isinstance(model.lm_head.embedding_transform, torch.Tensor)
    saved = fptq.save(model, model.fptq_plan, tmp_path / "mem", tokenizer=make_tokenizer())
    assert _names(saved) == _names(out)
    assert json.loads((saved / "config.json").read_text())["quantization_config"]["head_from_embedding"] == \
        json.loads((out / "config.json").read_text())["quantization_config"]["head_from_embedding"]
    a, b = WeightIndex(saved).load(), WeightIndex(out).load()
    for k in a:
        assert torch.equal(a[k], b[k]), k

