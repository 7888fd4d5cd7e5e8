"""`fptq export --format compressed-tensors`, checked with the compressed-tensors library and transformers."""
import json

import pytest
import torch

import fptq
from fptq.cli import main
from fptq.export import EXPORT_REPORT_NAME, export
from fptq.nn import QuantLinear
from fptq.quant.pack import pack_int32_offset

from .conftest import make_tokenizer, sqnr_db, tiny_llama

IDS = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(1))


def _quantize(method="fptq", group_size=32):
    model = tiny_llama()
    calib = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    plan = fptq.quantize(model, fptq.method_config(method, group_size=group_size, thresholds=(2.0, 20.0)), calib,
                         device="cpu", progress=False)
    return model, plan


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One fptq checkpoint (all three strategies occur) and its two exports."""
    d = tmp_path_factory.mktemp("export")
    model, plan = _quantize()
    assert set(plan.counts()) == {"static_tensor", "lae_static_tensor", "dynamic_token"}
    src = fptq.save(model, plan, d / "src", tokenizer=make_tokenizer())
    return {"src": src, "plan": plan, "int8": export(src, d / "w4a8"), "none": export(src, d / "w4a16", activations="none")}


def _all_act_mode(model, mode):
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.act_mode = mode
    return model


@pytest.mark.parametrize("k", [8, 64, 96, 5, 33])
def test_pack_int32_offset_matches_compressed_tensors(k):
    ct = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    q = torch.randint(-8, 8, (7, k), dtype=torch.int8, generator=torch.Generator().manual_seed(k))
    packed = pack_int32_offset(q, 4)
    assert packed.dtype == torch.int32 and packed.shape == (7, -(-k // 8))
    assert torch.equal(packed, ct.pack_to_int32(q, 4))
    assert torch.equal(ct.unpack_from_int32(packed, 4, torch.Size([7, k])), q)


@pytest.mark.parametrize("activations", ["int8", "none"])
def test_compressed_tensors_decompression_is_bit_exact(exported, activations):
    """compressed-tensors' own decompressor gives back fptq's dequantized weights bit for bit, with the
    scales in float32 (as transformers holds them for a float32 model). In float16 arithmetic (scales left
    in their stored dtype) q*s is rounded to float16: within 2**-11 relative."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    out = exported[activations]
    qc = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
    assert qc.format == ("int-quantized" if activations == "int8" else "pack-quantized")
    sd = load_file(str(out / "model.safetensors"))
    ref = fptq.load(exported["src"], backend="reference")
    seen = 0
    for scheme in qc.config_groups.values():
        compressor = BaseCompressor.get_value_from_registry(scheme.format)
        for name in scheme.targets:
            local = {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".")}
            assert local["weight_scale"].dtype == torch.float16
            want = ref.get_submodule(name).dequantized_weight()
            w = compressor.decompress({**local, "weight_scale": local["weight_scale"].float()}, scheme)["weight"]
            assert w.dtype == torch.float32 and torch.equal(w, want), name
            w16 = compressor.decompress(local, scheme)["weight"].float()
            assert torch.allclose(w16, want, rtol=2**-11, atol=0), name
            seen += 1
    assert seen == 14


def test_transformers_loads_w4a8_export(exported):
    """transformers (compressed-tensors installed) decompresses the weights exactly and quantizes
    activations per token with compressed-tensors' convention (scale absmax/127.5, codes -128..127);
    fptq's dynamic layers use absmax/127, codes -127..127 (as vLLM's int8 kernels do). So: logits equal
    a reference with fptq's weights and compressed-tensors' convention exactly, and fptq's own model with
    all layers dynamic within the noise of that convention change (31 dB SQNR measured on this tiny
    random model, whose logits are only 13 dB from the float model's)."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(exported["int8"])
    with torch.no_grad():
        got = hf(IDS).logits
    ref = fptq.load(exported["src"], backend="reference")
    for name in exported["plan"].layers:  # weights decompressed on load are fptq's, bit for bit
        assert torch.equal(hf.get_submodule(name).weight, ref.get_submodule(name).dequantized_weight()), name

    class CompressedTensorsConvention(torch.nn.Module):
        def __init__(self, q):
            super().__init__()
            self.w, self.b = q.dequantized_weight(), q.bias

        def forward(self, x):
            s = x.abs().amax(dim=-1, keepdim=True) / 127.5
            return torch.nn.functional.linear(torch.clamp(torch.round(x / s), -128, 127) * s, self.w, self.b)

    emulated = fptq.load(exported["src"], backend="reference")
    for name in exported["plan"].layers:
        parent, _, child = name.rpartition(".")
        setattr(emulated.get_submodule(parent), child, CompressedTensorsConvention(emulated.get_submodule(name)))
    with torch.no_grad():
        assert torch.equal(got, emulated(IDS).logits)
        dynamic = _all_act_mode(fptq.load(exported["src"], backend="reference"), "dynamic_token")(IDS).logits
        float_logits = tiny_llama()(IDS).logits
    assert sqnr_db(dynamic, got) > 25
    assert abs(sqnr_db(float_logits, got) - sqnr_db(float_logits, dynamic)) < 1.0
    assert (got.argmax(-1) == dynamic.argmax(-1)).float().mean() > 0.9


def test_transformers_loads_w4a16_export_exactly(exported):
    """Weight-only export: transformers' logits equal fptq's model with float activations bit for bit."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(exported["none"])
    with torch.no_grad():
        assert torch.equal(hf(IDS).logits, _all_act_mode(fptq.load(exported["src"], backend="reference"), "none")(IDS).logits)
        assert hf.generate(IDS[:1, :4], max_new_tokens=4, do_sample=False).shape == (1, 8)


def test_export_layout_and_report(exported):
    from safetensors import safe_open

    out, plan = exported["int8"], exported["plan"]
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "fptq_plan.json", EXPORT_REPORT_NAME} <= names
    assert "quantize_report.json" not in names
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["ignore"] == ["lm_head"] and len(cfg["config_groups"]) == 1
    group = cfg["config_groups"]["group_0"]
    assert sorted(group["targets"]) == sorted(plan.layers)
    assert group["weights"] == {"num_bits": 4, "type": "int", "symmetric": True, "dynamic": False,
                                "strategy": "group", "group_size": 32}
    assert group["input_activations"]["strategy"] == "token" and group["input_activations"]["dynamic"] is True
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        w = f.get_tensor("model.layers.0.mlp.down_proj.weight")
    assert w.dtype == torch.int8 and w.shape == (64, 96) and int(w.min()) >= -8 and int(w.max()) <= 7
    assert not any(k.endswith((".qweight", ".w_scales", ".act_scale")) for k in keys)
    rep = json.loads((out / EXPORT_REPORT_NAME).read_text())
    static = sorted(n for n, lp in plan.layers.items() if lp.strategy in ("static_tensor", "lae_static_tensor"))
    assert rep["layers_static_to_dynamic"] == static and static
    assert rep["kept"]["layers_with_folded_equalization"]
    assert rep["files"]["model.safetensors"]["bytes"] == (out / "model.safetensors").stat().st_size
    assert rep["layers"][static[0]]["dropped_static_act_scale"] == plan.layers[static[0]].act_scale
    rep16 = json.loads((exported["none"] / EXPORT_REPORT_NAME).read_text())
    assert rep16["layers_static_to_dynamic"] == [] and len(rep16["layers_activation_quantization_dropped"]) == 14


def test_sharded_export_loads(exported, tmp_path):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    out = export(exported["src"], tmp_path / "sharded", activations="none", max_shard_bytes=20_000)
    assert (out / "model.safetensors.index.json").is_file() and not (out / "model.safetensors").exists()
    hf = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert torch.equal(hf(IDS).logits, AutoModelForCausalLM.from_pretrained(exported["none"])(IDS).logits)


def test_ragged_last_group_is_refused_naming_the_layer(tmp_path):
    model, plan = _quantize(group_size=40)  # 40 divides neither 64 nor 96
    src = fptq.save(model, plan, tmp_path / "src")
    with pytest.raises(fptq.FptqError, match=r"model\.layers\.0\.\w+\.\w+_proj: group size 40 does not divide.*--group-size 32"):
        export(src, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def test_8bit_weights_are_refused(tmp_path):
    model, plan = _quantize(method="smoothquant-w8a8")
    src = fptq.save(model, plan, tmp_path / "src")
    with pytest.raises(fptq.FptqError, match="8-bit weights cannot be exported"):
        export(src, tmp_path / "ct")


def test_cli_refuses_existing_output_without_force(exported, tmp_path, capsys):
    out = tmp_path / "ct"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    args = ["export", str(exported["src"]), "--format", "compressed-tensors", "-o", str(out)]
    assert main(args) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "keep me"
    assert main(args + ["--force"]) == 0
    text = capsys.readouterr().out
    assert "static/LAE+static layers now quantize their input dynamically" in text
    assert not (out / "precious.txt").exists() and (out / EXPORT_REPORT_NAME).is_file()
    assert main(["export", str(exported["src"]), "-o", str(exported["src"]), "--force"]) == 2
    assert "is the checkpoint being exported" in capsys.readouterr().err
