"""Resumable runs, layer-by-layer loading from safetensors shards, sharded checkpoints."""
import json
import shlex

import pytest
import torch

import fptq
from fptq.cli import main
from fptq.io import INDEX_NAME, PLAN_NAME, WEIGHTS_NAME, weight_files
from fptq.resume import QuantizeInterrupted, partial_dir
from fptq.workflow import quantize_to_dir

from .conftest import as_stored, make_tokenizer, tiny_llama

SETTINGS = dict(nsamples=4, seqlen=32, device="cpu", progress=False)


@pytest.fixture
def model_dir(tmp_path):
    """A 3-layer tiny LLaMA saved as two safetensors shards with an index."""
    d = tmp_path / "m3"
    tiny_llama(num_hidden_layers=3).save_pretrained(d, max_shard_size="60KB")
    make_tokenizer().save_pretrained(d)
    assert (d / INDEX_NAME).is_file()
    return d


def _config():
    return fptq.method_config("fptq", group_size=32, thresholds=(2.0, 20.0))


def _weights(out):
    return {name: (out / name).read_bytes() for name in weight_files(out)}


def _interrupt_after(k):
    def hook(res):
        if res.index == k:
            raise KeyboardInterrupt
    return hook


@pytest.fixture
def reference(model_dir, calib_file, tmp_path):
    out = tmp_path / "ref"
    quantize_to_dir(str(model_dir), out, _config(), calib=str(calib_file), **SETTINGS)
    return out


@pytest.mark.parametrize("k", [0, 1])
def test_interrupted_then_resumed_run_is_byte_identical(model_dir, calib_file, tmp_path, reference, k):
    out = tmp_path / "q"
    with pytest.raises(QuantizeInterrupted) as e:
        quantize_to_dir(str(model_dir), out, _config(), calib=str(calib_file), on_layer_done=_interrupt_after(k),
                        **SETTINGS)
    assert e.value.layers_done == k + 1 and e.value.layers_total == 3
    assert not out.exists() and partial_dir(out).is_dir()
    _, report = quantize_to_dir(str(model_dir), out, _config(), calib=str(calib_file), resume=True, **SETTINGS)
    assert _weights(out) == _weights(reference) and WEIGHTS_NAME in _weights(out)
    assert json.loads((out / PLAN_NAME).read_text()) == json.loads((reference / PLAN_NAME).read_text())
    assert report["resume"]["resumed_at_layer"] == k + 1
    assert report["resume"]["manifest"]["settings"]["nsamples"] == 4
    assert not partial_dir(out).exists()
    fptq.load(out)  # hashes verified


def test_resume_with_other_settings_is_refused(model_dir, calib_file, tmp_path):
    out = tmp_path / "q"
    with pytest.raises(QuantizeInterrupted):
        quantize_to_dir(str(model_dir), out, _config(), calib=str(calib_file), on_layer_done=_interrupt_after(0),
                        **SETTINGS)
    with pytest.raises(fptq.FptqError, match=r"other settings.*config\.group_size \(32 vs 64\)"):
        quantize_to_dir(str(model_dir), out, fptq.method_config("fptq", group_size=64, thresholds=(2.0, 20.0)),
                        calib=str(calib_file), resume=True, **SETTINGS)
    with pytest.raises(fptq.FptqError, match=r"seed \(0 vs 1\)"):
        quantize_to_dir(str(model_dir), out, _config(), calib=str(calib_file), resume=True,
                        **{**SETTINGS, "seed": 1})
    other = tmp_path / "other"
    tiny_llama(seed=1, num_hidden_layers=3).save_pretrained(other)
    make_tokenizer().save_pretrained(other)
    with pytest.raises(fptq.FptqError, match="model_fingerprint"):
        quantize_to_dir(str(other), out, _config(), calib=str(calib_file), resume=True, **SETTINGS)
    assert not out.exists() and partial_dir(out).is_dir()


def test_unfinished_run_is_reported_without_resume(model_dir, calib_file, tmp_path, reference):
    out = tmp_path / "q"
    with pytest.raises(QuantizeInterrupted):
        quantize_to_dir(str(model_dir), out, _config(), calib=str(calib_file), on_layer_done=_interrupt_after(1),
                        **SETTINGS)
    with pytest.raises(fptq.FptqError, match="2 of 3 layers done.*pass --resume to continue or --force to start over"):
        quantize_to_dir(str(model_dir), out, _config(), calib=str(calib_file), **SETTINGS)
    done = []
    quantize_to_dir(str(model_dir), out, _config(), calib=str(calib_file), force=True,
                    on_layer_done=lambda r: done.append(r.index), **SETTINGS)
    assert done == [0, 1, 2] and _weights(out) == _weights(reference) and not partial_dir(out).exists()


def test_ctrl_c_in_the_cli_prints_the_resume_command(model_dir, calib_file, tmp_path, reference, monkeypatch,
                                                     capsys):
    import fptq.pipeline as pipeline

    out = tmp_path / "q"
    real = pipeline.quantize_layer
    calls = []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C in the middle of layer 1
        return real(*a, **k)

    monkeypatch.setattr(pipeline, "quantize_layer", interrupted)
    argv = ["quantize", str(model_dir), "-o", str(out), "--calib", str(calib_file), "--nsamples", "4", "--seqlen",
            "32", "--group-size", "32", "--thresholds", "2,20", "--device", "cpu"]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "interrupted after 1 of 3 layers" in err and "Traceback" not in err and not out.exists()
    cmd = err.strip().splitlines()[-1].strip()
    assert cmd.startswith("fptq quantize") and cmd.endswith("--resume")
    monkeypatch.setattr(pipeline, "quantize_layer", real)
    assert main(shlex.split(cmd)[1:]) == 0
    assert _weights(out) == _weights(reference)


def test_sharded_checkpoint_loads_like_single_file(model_dir, calib_file, tmp_path, reference):
    out = tmp_path / "sharded"
    quantize_to_dir(str(model_dir), out, _config(), calib=str(calib_file), max_shard_size=20_000, **SETTINGS)
    files = weight_files(out)
    assert len(files) > 2 and (out / INDEX_NAME).is_file() and not (out / WEIGHTS_NAME).exists()
    rep = json.loads((out / "quantize_report.json").read_text())
    assert set(files) <= set(rep["files"]) and rep["layer_by_layer_loading"] is True
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    a, b = fptq.load(out), fptq.load(reference)
    assert torch.equal(a(ids).logits, b(ids).logits)
    # tampering with any shard is detected
    data = bytearray((out / files[1]).read_bytes())
    data[-3] ^= 0xFF
    (out / files[1]).write_bytes(bytes(data))
    with pytest.raises(fptq.FptqError, match="sha256"):
        fptq.load(out)


@pytest.mark.parametrize("tied", [False, True])
def test_layer_by_layer_matches_in_memory_api(calib_file, tmp_path, tied):
    """Loading one layer at a time gives the model the in-memory Python API gives."""
    d = tmp_path / "m"
    tiny_llama(num_hidden_layers=2, tie_word_embeddings=tied).save_pretrained(d, max_shard_size="60KB")
    make_tokenizer().save_pretrained(d)
    out = tmp_path / "q"
    _, report = quantize_to_dir(str(d), out, _config(), calib=str(calib_file), **SETTINGS)
    assert report["layer_by_layer_loading"] is True
    model, tok, _ = fptq.load_float_model(str(d))
    windows = fptq.calibration_windows(tok, fptq.read_text(str(calib_file)), 4, 32, 0)
    plan = fptq.quantize(model, _config(), windows, device="cpu", progress=False)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(2))
    loaded = fptq.load(out, backend="reference")
    assert torch.equal(loaded(ids).logits, as_stored(model)(ids).logits)
    assert loaded.fptq_plan.to_dict()["layers"] == plan.to_dict()["layers"]


def test_data_free_rtn_resumes_byte_identical(model_dir, calib_file, tmp_path):
    """Weight-only RTN runs no layer (no activations are saved between layers) and still resumes exactly."""
    cfg = fptq.method_config("rtn-w4a16", group_size=32)
    ref = tmp_path / "ref"
    quantize_to_dir(str(model_dir), ref, cfg, calib=str(calib_file), **SETTINGS)
    out = tmp_path / "q"
    with pytest.raises(QuantizeInterrupted):
        quantize_to_dir(str(model_dir), out, cfg, calib=str(calib_file), on_layer_done=_interrupt_after(1), **SETTINGS)
    quantize_to_dir(str(model_dir), out, cfg, calib=str(calib_file), resume=True, **SETTINGS)
    assert _weights(out) == _weights(ref)
    plan = json.loads((out / PLAN_NAME).read_text())
    assert {lp["act_absmax"] for lp in plan["layers"].values()} == {None}
    fptq.load(out)  # hashes verified


def test_resumed_run_spends_the_dynamic_budget_as_an_uninterrupted_one(model_dir, calib_file, tmp_path):
    """The budget of ``dynamic_share`` is spread over the layers: a resumed run counts what the layers before it
    spent (a run that forgot would give its later layers more)."""
    cfg = fptq.method_config("fptq", group_size=32, dynamic_share=0.3)
    ref, out = tmp_path / "ref", tmp_path / "q"
    quantize_to_dir(str(model_dir), ref, cfg, calib=str(calib_file), **SETTINGS)
    plan = json.loads((ref / PLAN_NAME).read_text())
    per_layer = [sum(e["strategy"] == "dynamic_token" for k, e in plan["layers"].items()
                     if k.startswith(f"model.layers.{i}.")) for i in range(3)]
    assert per_layer[0] > 0 and sum(per_layer) <= int(0.3 * 21), per_layer
    with pytest.raises(QuantizeInterrupted):
        quantize_to_dir(str(model_dir), out, cfg, calib=str(calib_file), on_layer_done=_interrupt_after(0), **SETTINGS)
    quantize_to_dir(str(model_dir), out, cfg, calib=str(calib_file), resume=True, **SETTINGS)
    assert json.loads((out / PLAN_NAME).read_text()) == plan
    assert _weights(out) == _weights(ref)
