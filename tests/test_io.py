"""Checkpoint save/load: exact round trip, atomic writes, tamper detection."""
import json

import pytest
import torch

import fptq
from fptq.io import PLAN_NAME, REPORT_NAME, WEIGHTS_NAME

from .conftest import make_tokenizer, tiny_llama


def _quantized(method="fptq", **kw):
    model = tiny_llama(**kw)
    ids = torch.randint(0, 300, (8, 32), generator=torch.Generator().manual_seed(0))
    plan = fptq.quantize(model, fptq.method_config(method, group_size=32, thresholds=(2.0, 20.0)), ids,
                         device="cpu", progress=False)
    return model, plan, ids


@pytest.mark.parametrize("method", ["fptq", "rtn-w4a16", "smoothquant-w8a8"])
def test_save_load_logits_match_exactly(tmp_path, method):
    model, plan, ids = _quantized(method)
    ref = model(ids).logits
    out = fptq.save(model, plan, tmp_path / "out", tokenizer=make_tokenizer())
    loaded = fptq.load(out)
    assert torch.equal(loaded(ids).logits, ref)
    assert loaded.fptq_plan.to_dict() == plan.to_dict()


def test_checkpoint_layout(tmp_path):
    model, plan, _ = _quantized()
    out = fptq.save(model, plan, tmp_path / "out", tokenizer=make_tokenizer())
    names = {p.name for p in out.iterdir()}
    assert {WEIGHTS_NAME, "config.json", PLAN_NAME, REPORT_NAME, "tokenizer.json"} <= names
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "fptq"
    from safetensors import safe_open

    with safe_open(str(out / WEIGHTS_NAME), "pt") as f:
        qw = f.get_tensor("model.layers.0.mlp.down_proj.qweight")
        sc = f.get_tensor("model.layers.0.mlp.down_proj.w_scales")
        assert "model.layers.0.mlp.down_proj.weight" not in f.keys()
    assert qw.dtype == torch.uint8 and qw.shape == (64, 48)  # int4 packed two per byte
    assert sc.dtype == torch.float16 and sc.shape == (64, 3)
    plan_json = json.loads((out / PLAN_NAME).read_text())
    assert plan_json["version"] == 1 and len(plan_json["layers"]) == 14
    rep = json.loads((out / REPORT_NAME).read_text())
    assert rep["files"][WEIGHTS_NAME]["bytes"] == (out / WEIGHTS_NAME).stat().st_size


def test_existing_output_refused_without_force(tmp_path):
    model, plan, _ = _quantized()
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(fptq.FptqError, match="--force"):
        fptq.save(model, plan, out)
    assert (out / "precious.txt").read_text() == "keep me"
    fptq.save(model, plan, out, force=True)
    assert not (out / "precious.txt").exists() and (out / WEIGHTS_NAME).is_file()


def test_failed_save_leaves_no_output(tmp_path, monkeypatch):
    model, plan, _ = _quantized()

    class Boom(Exception):
        pass

    def broken_save(*a, **k):
        raise Boom()

    monkeypatch.setattr(plan, "save", broken_save)
    with pytest.raises(Boom):
        fptq.save(model, plan, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_tampered_checkpoint_is_refused(tmp_path):
    model, plan, _ = _quantized()
    out = fptq.save(model, plan, tmp_path / "out")
    data = bytearray((out / WEIGHTS_NAME).read_bytes())
    data[-5] ^= 0xFF
    (out / WEIGHTS_NAME).write_bytes(bytes(data))
    with pytest.raises(fptq.FptqError, match="sha256"):
        fptq.load(out)


def test_truncated_checkpoint_is_refused(tmp_path):
    model, plan, _ = _quantized()
    out = fptq.save(model, plan, tmp_path / "out")
    data = (out / WEIGHTS_NAME).read_bytes()
    (out / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(fptq.FptqError, match="truncated"):
        fptq.load(out)
    with pytest.raises(fptq.FptqError, match="corrupt or truncated"):
        fptq.load(out, verify=False)


def test_load_rejects_non_checkpoint(tmp_path):
    with pytest.raises(fptq.FptqError, match="not an fptq checkpoint"):
        fptq.load(tmp_path)


def test_model_runs_with_autograd_after_inference_mode_use(tmp_path):
    model, plan, ids = _quantized()
    with torch.inference_mode():
        ref = model(ids).logits.clone()
    out = model(ids).logits  # grad mode after an inference-mode call (caches filled there)
    assert torch.equal(out.detach(), ref)
