"""Every bad input ends with one ``fptq: error: ...`` line (exit code 2) and no OUT that looks complete."""
import errno
import json
import shutil

import pytest
import torch

import fptq
from fptq.cli import main
from fptq.resume import partial_dir

from .conftest import make_tokenizer, tiny_llama, write_tiny_gguf

SMALL = ["--nsamples", "2", "--seqlen", "32", "--group-size", "32", "--device", "cpu"]


@pytest.fixture
def out(tmp_path):
    return tmp_path / "q"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FPTQ_CACHE", str(tmp_path / "cache"))


def fails(capsys, out, *args, message):
    """Run ``fptq quantize ARGS -o OUT``; check exit 2, one error line containing ``message``, no OUT."""
    capsys.readouterr()  # drop what building the test model printed
    rc = main(["quantize", *map(str, args), "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert message in err, err
    last = err.rstrip("\n").split("\n")[-1]  # earlier lines: the progress bar, if quantization started
    assert "Traceback" not in err and last.startswith("fptq: error: ") and err.count("fptq: error") == 1
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.incomplete")]
    return err


def _model_dir(path, **kw):
    tiny_llama(**kw).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def _config_dir(path, cfg):
    path.mkdir()
    (path / "config.json").write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
    return path


def test_missing_model_path(tmp_path, out, capsys):
    fails(capsys, out, tmp_path / "nope", message="model path not found")


def test_unreadable_model_path(tiny_model_dir, out, capsys, monkeypatch):
    import transformers

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(tiny_model_dir / "config.json"))

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", denied)
    fails(capsys, out, tiny_model_dir, message="Permission denied")


def test_directory_without_config(tmp_path, out, capsys):
    (tmp_path / "notmodel").mkdir()
    fails(capsys, out, tmp_path / "notmodel", message="no config.json: it is not a Hugging Face model directory")


def test_config_that_is_not_a_model(tmp_path, out, capsys):
    fails(capsys, out, _config_dir(tmp_path / "m", {"hidden_size": 3}), message="give a Hugging Face causal LM directory")


def test_config_that_is_not_json(tmp_path, out, capsys):
    fails(capsys, out, _config_dir(tmp_path / "m", "{nope"), message="not a valid JSON file")


@pytest.mark.parametrize("model_type", ["bert", "gpt2"])
def test_unsupported_architecture(tmp_path, out, capsys, model_type):
    fails(capsys, out, _config_dir(tmp_path / "m", {"model_type": model_type}),
          message=f"unsupported architecture {model_type!r}; fptq supports: llama, mistral, qwen2, qwen3")


def test_corrupt_safetensors(tiny_model_dir, calib_file, out, capsys):
    (tiny_model_dir / "model.safetensors").write_bytes(b"garbage" * 100)
    fails(capsys, out, tiny_model_dir, "--calib", calib_file, *SMALL, message="model.safetensors is corrupt")


def test_truncated_safetensors(tiny_model_dir, calib_file, out, capsys):
    p = tiny_model_dir / "model.safetensors"
    p.write_bytes(p.read_bytes()[:-1000])
    fails(capsys, out, tiny_model_dir, "--calib", calib_file, *SMALL, message="model.safetensors is truncated")


def test_truncated_shard(tmp_path, calib_file, out, capsys):
    d = tmp_path / "m"
    tiny_llama().save_pretrained(d, max_shard_size="60KB")
    make_tokenizer().save_pretrained(d)
    shard = sorted(d.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    fails(capsys, out, d, "--calib", calib_file, *SMALL, message=f"{shard.name} is truncated")


def test_not_a_gguf_file(tmp_path, out, capsys):
    g = tmp_path / "x.gguf"
    g.write_bytes(b"not a gguf file" * 10)
    fails(capsys, out, g, message="is not a GGUF file")


def test_gguf_of_unsupported_architecture(tmp_path, out, capsys):
    pytest.importorskip("gguf")
    path = write_tiny_gguf(tmp_path / "bert.gguf", "bert")
    fails(capsys, out, path, message="architecture 'bert', which fptq does not support; fptq supports: llama")


def test_missing_calibration_file(tiny_model_dir, tmp_path, out, capsys):
    fails(capsys, out, tiny_model_dir, "--calib", tmp_path / "missing.txt", *SMALL, message="file not found")


def test_empty_calibration_file(tiny_model_dir, tmp_path, out, capsys):
    (tmp_path / "empty.txt").write_text("  \n")
    fails(capsys, out, tiny_model_dir, "--calib", tmp_path / "empty.txt", *SMALL, message="is empty")


def test_binary_calibration_file(tiny_model_dir, tmp_path, out, capsys):
    (tmp_path / "c.txt").write_bytes(b"\x00\x01\x02" * 100)
    fails(capsys, out, tiny_model_dir, "--calib", tmp_path / "c.txt", *SMALL, message="looks binary, not text")


def test_calibration_too_short(tiny_model_dir, calib_file, out, capsys):
    err = fails(capsys, out, tiny_model_dir, "--calib", calib_file, "--seqlen", "32", "--nsamples", "100000",
                "--device", "cpu", message="enough for")
    assert "windows of 32 tokens" in err and "--nsamples" in err


def test_nan_in_weights_names_the_weight(tmp_path, calib_file, out, capsys):
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    d = tmp_path / "m"
    model.save_pretrained(d)
    make_tokenizer().save_pretrained(d)
    fails(capsys, out, d, "--calib", calib_file, *SMALL, message="model.layers.1.mlp.up_proj.weight contains NaN")
    assert not partial_dir(out).exists() or not (partial_dir(out) / "layer-00001.safetensors").exists()


def test_inf_in_activations_names_the_layer():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(1e36)  # finite weights, overflowing activations
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(fptq.FptqError, match=r"non-finite values \(NaN or Inf\).*model\.layers\.[01]"):
        fptq.quantize(model, fptq.method_config("fptq", group_size=32), ids, device="cpu", progress=False)


@pytest.mark.parametrize("args,message", [
    (["--wbits", "5"], "--wbits must be one of 2, 3, 4, 8 or 16"),
    (["--abits", "5"], "--abits must be 4, 8 or 16"),
    (["--group-size", "3"], "--group-size must be at least 8"),
    (["--group-scales", "integer", "--group-size", "-1"], "integer group scales are for 4-bit weights in groups"),
    (["--group-scales", "integer", "--method", "fptq-qat"], "trains its own float16 scales"),
])
def test_invalid_settings(tiny_model_dir, calib_file, out, capsys, args, message):
    fails(capsys, out, tiny_model_dir, "--calib", calib_file, "--seqlen", "32", *args, message=message)


@pytest.mark.parametrize("value", ["150,15", "abc", "1,2,3", "0,5"])
def test_invalid_thresholds(tiny_model_dir, out, capsys, value):
    with pytest.raises(SystemExit) as e:
        main(["quantize", str(tiny_model_dir), "-o", str(out), "--thresholds", value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--thresholds" in err and "like 15,150" in err and "Traceback" not in err
    assert not out.exists()


def test_existing_output_refused_without_force(tiny_model_dir, calib_file, tmp_path, capsys):
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep").write_text("1")
    rc = main(["quantize", str(tiny_model_dir), "-o", str(out), "--calib", str(calib_file), *SMALL])
    assert rc == 2 and "pass --force to replace it" in capsys.readouterr().err
    assert (out / "keep").read_text() == "1"


def test_unwritable_output_dir(tiny_model_dir, calib_file, out, capsys, monkeypatch):
    import tempfile

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", denied)  # running as root: chmod cannot make a directory unwritable
    fails(capsys, out, tiny_model_dir, "--calib", calib_file, *SMALL, message="Permission denied; choose another -o")


def test_disk_full_while_saving_the_checkpoint(tiny_model_dir, calib_file, out, capsys, monkeypatch):
    import fptq.io

    real = fptq.io.write_safetensors

    def full(path, *a, **k):
        path.write_bytes(b"partial")  # the disk filled up half way
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fptq.io, "write_safetensors", full)
    err = fails(capsys, out, tiny_model_dir, "--calib", calib_file, *SMALL, message="no space left on device")
    assert "--resume" in err and partial_dir(out).is_dir()
    monkeypatch.setattr(fptq.io, "write_safetensors", real)
    assert main(["quantize", str(tiny_model_dir), "-o", str(out), "--calib", str(calib_file), *SMALL, "--resume"]) == 0
    assert not partial_dir(out).exists()


def test_disk_full_while_saving_progress(tiny_model_dir, calib_file, out, capsys, monkeypatch):
    import fptq.resume

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fptq.resume, "write_safetensors", full)
    fails(capsys, out, tiny_model_dir, "--calib", calib_file, *SMALL,
          message="no space left on device while saving progress")


def test_remote_code_refused_without_flag(tmp_path, out, capsys):
    d = _config_dir(tmp_path / "m", {"model_type": "my-model", "auto_map": {"AutoConfig": "cfg.MyConfig"}})
    fails(capsys, out, d, message="needs custom code; pass --trust-remote-code")
    shutil.rmtree(d)
    d = _model_dir(tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling.MyLlama"}
    (d / "config.json").write_text(json.dumps(cfg))
    fails(capsys, out, d, message="needs custom code (auto_map in config.json); pass --trust-remote-code")
