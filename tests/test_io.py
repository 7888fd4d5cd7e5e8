"""Checkpoint save/load: exact round trip, 16-bit unquantized tensors, atomic writes, tamper detection."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import fptq
from fptq.cli import main
from fptq.hf import set_backend
from fptq.io import PLAN_NAME, REPORT_NAME, WEIGHTS_NAME
from fptq.nn import QuantLinear
from fptq.st import read_header, read_tensors
from fptq.workflow import model_sizes

from .conftest import as_stored, make_tokenizer, tiny_llama

QUANT_BUFFERS = ("qweight", "w_scales", "act_scale")


def _quantized(method="fptq", dtype=torch.float32, **kw):
    model = tiny_llama(**kw).to(dtype)
    ids = torch.randint(0, 300, (8, 32), generator=torch.Generator().manual_seed(0))
    plan = fptq.quantize(model, fptq.method_config(method, group_size=32, thresholds=(2.0, 20.0)), ids,
                         device="cpu", progress=False)
    return model, plan, ids


def _stored_dtypes(out):
    header, _ = read_header(out / WEIGHTS_NAME)
    return {k: v["dtype"] for k, v in header.items() if k != "__metadata__"}


def _quant_buffers(model):
    return {f"{n}.{b}": getattr(m, b) for n, m in model.named_modules() if isinstance(m, QuantLinear)
            for b in QUANT_BUFFERS}


@pytest.mark.parametrize("keep_dtype", [False, True])
@pytest.mark.parametrize("method", ["fptq", "rtn-w4a16", "smoothquant-w8a8"])
def test_save_load_logits_match_exactly(tmp_path, method, keep_dtype):
    """--keep-dtype: the in-memory model exactly; default: exactly the in-memory model with its unquantized
    tensors rounded to bfloat16 (computed in float32), the codes and scales bit for bit."""
    model, plan, ids = _quantized(method)
    ref = (model if keep_dtype else as_stored(model))(ids).logits
    out = fptq.save(model, plan, tmp_path / "out", tokenizer=make_tokenizer(), keep_dtype=keep_dtype)
    loaded = fptq.load(out, backend="reference")
    assert loaded.dtype == torch.float32
    assert torch.equal(loaded(ids).logits, ref)
    assert loaded.fptq_plan.to_dict() == plan.to_dict()
    got, want = _quant_buffers(loaded), _quant_buffers(model)
    assert got.keys() == want.keys() and all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k])
                                             for k in want)


@pytest.mark.parametrize("source,keep_dtype,stored", [
    (torch.float32, False, "BF16"),  # a float32 model is not a reason to store float32
    (torch.float32, True, "F32"),
    (torch.float16, False, "F16"),  # 16-bit sources keep their dtype
    (torch.bfloat16, False, "BF16"),
])
def test_unquantized_tensors_are_stored_in_16_bits(tmp_path, source, keep_dtype, stored):
    model, plan, ids = _quantized(dtype=source)
    out = fptq.save(model, plan, tmp_path / "out", keep_dtype=keep_dtype)
    dtypes = _stored_dtypes(out)
    quant = {k: v for k, v in dtypes.items() if k.rsplit(".", 1)[1] in QUANT_BUFFERS}
    assert {k.rsplit(".", 1)[1]: v for k, v in quant.items()} == {"qweight": "U8", "w_scales": "F16",
                                                                   "act_scale": "F32"}
    rest = {k: v for k, v in dtypes.items() if k not in quant}
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
            "model.layers.0.input_layernorm.weight"} <= rest.keys()
    assert set(rest.values()) == {stored}
    assert json.loads((out / "config.json").read_text())["dtype"] == str(source).removeprefix("torch.")
    loaded = fptq.load(out, backend="reference")
    assert loaded.dtype == source  # the source's compute dtype: stored bfloat16 of a float32 model is upcast
    if source != torch.float32:  # nothing was rounded: every tensor as in memory, bit for bit
        got, want = loaded.state_dict(), model.state_dict()
        assert got.keys() == want.keys()
        assert all(got[k].dtype == v.dtype and torch.equal(got[k], v) for k, v in want.items())


def test_sizes_say_which_tensors_are_16_bit_and_match_the_file(tmp_path):
    model, plan, _ = _quantized()
    sizes = {keep: model_sizes(model, keep_dtype=keep) for keep in (False, True)}
    assert sizes[False]["stored"]["unquantized"]["dtypes"].keys() == {"bfloat16"}
    assert sizes[True]["stored"]["unquantized"]["dtypes"].keys() == {"float32"}
    assert sizes[False]["stored"]["group_scales"]["dtypes"].keys() == {"float16"}
    assert sizes[False]["stored"]["static_act_scales"]["dtypes"].keys() == {"float32"}
    assert 2 * sizes[False]["other_bytes"] == sizes[True]["other_bytes"]
    assert sizes[False]["quantized_linear_bytes"] == sizes[True]["quantized_linear_bytes"]
    for keep in (False, True):
        out = fptq.save(model, plan, tmp_path / f"out{keep}", keep_dtype=keep)
        header, _ = read_header(out / WEIGHTS_NAME)
        data = sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")
        assert data == sizes[keep]["quantized_linear_bytes"] + sizes[keep]["other_bytes"]


@pytest.mark.parametrize("source", [torch.float32, torch.bfloat16])
def test_quantize_command_writes_16_bit_tensors_unless_keep_dtype(tmp_path, calib_file, source):
    """The streaming path (layer files copied into the checkpoint): the same codes and scales with and
    without --keep-dtype, the unquantized tensors rounded to 16 bits, and fptq.load and
    AutoModelForCausalLM.from_pretrained give the same logits."""
    src = tmp_path / "m"
    tiny_llama(attention_bias=True).to(source).save_pretrained(src)  # biases: 16-bit like the rest
    make_tokenizer().save_pretrained(src)
    small = ["--calib", str(calib_file), "--nsamples", "2", "--seqlen", "32", "--group-size", "32", "--device", "cpu"]
    outs = {keep: tmp_path / f"q{keep}" for keep in (False, True)}
    for keep, out in outs.items():
        assert main(["quantize", str(src), "-o", str(out), *small, *(["--keep-dtype"] * keep)]) == 0
    tensors = {keep: dict(read_tensors(out / WEIGHTS_NAME)) for keep, out in outs.items()}
    assert tensors[False].keys() == tensors[True].keys()
    want = torch.bfloat16 if source == torch.float32 else source
    for k, kept in tensors[True].items():
        got = tensors[False][k]
        if k.rsplit(".", 1)[1] in QUANT_BUFFERS or not kept.is_floating_point():
            assert got.dtype == kept.dtype and torch.equal(got, kept), k
        else:
            assert kept.dtype == source and got.dtype == want and torch.equal(got, kept.to(want)), k
    reports = {keep: json.loads((out / REPORT_NAME).read_text())["sizes"] for keep, out in outs.items()}
    assert reports[False]["stored"]["unquantized"]["dtypes"].keys() == {str(want).removeprefix("torch.")}
    assert reports[True]["stored"]["unquantized"]["dtypes"].keys() == {str(source).removeprefix("torch.")}
    if source == torch.float32:
        assert reports[False]["checkpoint_bytes"] < reports[True]["checkpoint_bytes"]
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    for keep, out in outs.items():
        ref = fptq.load(out, backend="reference")  # transformers' modules: the source model's dtype
        assert ref.dtype == source
        # with fptq's runtime behind them (both do that by default), the unquantized tensors stay as stored
        ref = set_backend(fptq.load(out), "reference")
        hf = set_backend(AutoModelForCausalLM.from_pretrained(out), "reference")  # the same numerics as ref
        assert ref.dtype == hf.dtype == (source if keep else want)
        sd_ref, sd_hf = ref.state_dict(), hf.state_dict()
        assert all(sd_hf[k].dtype == v.dtype and torch.equal(sd_hf[k], v) for k, v in sd_ref.items())
        with torch.no_grad():
            assert torch.equal(ref(ids).logits, hf(ids).logits)


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


def test_streamed_reads_and_conversions_equal_whole_tensors(tmp_path):
    """Tensors larger than memory allows are read and converted piece by piece (the finiteness check at load,
    the 16-bit conversion of float32 embeddings and lm_head at save): the same values and bytes as whole."""
    from safetensors.torch import save_file

    from fptq.st import WeightIndex, cast_entry, file_entries, read_chunks, write_safetensors

    g = torch.Generator().manual_seed(0)
    t = torch.randn(1000, 37, generator=g)
    bad = t.clone()
    bad[-1, -1] = float("nan")  # in the last piece
    save_file({"t": t, "bad": bad}, str(tmp_path / "model.safetensors"))
    pieces = list(read_chunks(tmp_path / "model.safetensors", "t", chunk_bytes=4096 + 2))  # not a whole element
    assert len(pieces) > 1 and all(p.numel() * 4 <= 4096 for p in pieces)
    assert torch.equal(torch.cat(pieces).view(1000, 37), t)
    index = WeightIndex(tmp_path)
    assert not index.nonfinite("t") and index.nonfinite("bad")
    entry = cast_entry(file_entries(tmp_path / "model.safetensors", ["t"])[0], torch.bfloat16)
    write_safetensors(tmp_path / "out.safetensors", [entry])
    (_, got), = read_tensors(tmp_path / "out.safetensors")
    assert got.dtype == torch.bfloat16 and torch.equal(got, t.to(torch.bfloat16))


def test_signed_scales_round_trip_and_run_on_the_default_backend(tmp_path):
    """--weight-scale-sign signed: negative float16 scales in the checkpoint, loaded bit for bit, and the
    integer kernels the loaded model runs on agree with the reference path."""
    model = tiny_llama()
    ids = torch.randint(0, 300, (8, 32), generator=torch.Generator().manual_seed(0))
    cfg = fptq.method_config("fptq", group_size=32, thresholds=(2.0, 20.0), weight_scale_sign="signed")
    plan = fptq.quantize(model, cfg, ids, device="cpu", progress=False)
    scales = torch.cat([b.flatten() for k, b in _quant_buffers(model).items() if k.endswith("w_scales")])
    assert bool((scales < 0).any()) and bool((scales > 0).any())
    out = fptq.save(model, plan, tmp_path / "out")
    ref = fptq.load(out, backend="reference")
    assert torch.equal(ref(ids).logits, as_stored(model)(ids).logits)
    assert json.loads((out / PLAN_NAME).read_text())["config"]["weight_scale_sign"] == "signed"
    fast = fptq.load(out)  # the integer kernels, in bfloat16: positive scales differ from the reference by 2.9% here
    assert fast.dtype == torch.bfloat16
    with torch.no_grad():
        a, b = fast(ids).logits.float(), ref(ids).logits.float()
    assert float((a - b).norm() / b.norm()) < 0.04
