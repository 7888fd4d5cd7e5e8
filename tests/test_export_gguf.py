"""`fptq export --format gguf`: read back with the gguf package and transformers' GGUF loader, and run in llama.cpp
(where a llama-cpp-python venv is given by FPTQ_LLAMA_CPP_PYTHON)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import fptq
from fptq.cli import main
from fptq.export import export
from fptq.export.gguf import export_float_gguf, report_path, rope_rows_to_ggml
from fptq.export.gguf_meta import bpe_pre_tokenizer
from fptq.nn import QuantLinear
from fptq.quant.pack import pack_q4_0, unpack_q4_0
from fptq.quant.weights import dequantize_weight

from .conftest import ROOT, make_tokenizer, sqnr_db, tiny_llama

gguf = pytest.importorskip("gguf")

IDS = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(1))
CALIB = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
LLAMA_PYTHON = os.environ.get("FPTQ_LLAMA_CPP_PYTHON")
WORKER = ROOT / "bench" / "_gguf_worker.py"


def _tiny_qwen2(seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[:3] *= 8
            for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                p.bias.normal_(0, 0.5)
    return model


def _checkpoint(tmp, family="llama", method="fptq", group_size=32, **kw):
    model = tiny_llama() if family == "llama" else _tiny_qwen2()
    plan = fptq.quantize(model, fptq.method_config(method, group_size=group_size, thresholds=(2.0, 20.0)), CALIB,
                         device="cpu", progress=False)
    return fptq.save(model, plan, tmp, tokenizer=make_tokenizer(), **kw), plan


def _float_activations(model):
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.act_mode = "none"
    return model


def _fields(path) -> dict:
    r = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}


def _tensors(path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def _decode_q4_0(data: np.ndarray, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes ``[n, k]`` and one float16 scale per 32-weight block, read from Q4_0 bytes (written here from the
    format's definition, independently of fptq.quant.pack)."""
    b = np.ascontiguousarray(data).reshape(n, k // 32, 18)
    d = b[..., :2].copy().view(np.float16)[..., 0]
    q = np.concatenate([b[..., 2:] & 15, b[..., 2:] >> 4], axis=-1).astype(np.int8) - 8
    return torch.from_numpy(q.reshape(n, k)), torch.from_numpy(d)


def _from_ggml_rows(t: torch.Tensor, heads: int) -> torch.Tensor:
    half = t.shape[0] // heads // 2
    return t.reshape(heads, half, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


@pytest.fixture(scope="module")
def llama_export(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    src, plan = _checkpoint(d / "src")
    assert set(plan.counts()) == {"static_tensor", "lae_static_tensor", "dynamic_token"}
    return {"src": src, "plan": plan, "out": export(src, d / "model.gguf", "gguf", progress=False)}


# ----------------------------------------------------------------------------------------------- packing maths
@pytest.mark.parametrize("k,group_size", [(64, 32), (128, 64), (192, 128), (96, -1), (160, 64)])
def test_pack_q4_0_is_exact(k, group_size):
    """gguf's own Q4_0 dequantization of the packed blocks equals fptq's weights bit for bit, for groups of 32,
    64, 128 (192 = 128 + a ragged 64), per channel and a ragged last group of 32; the codes come back."""
    g = torch.Generator().manual_seed(k)
    q = torch.randint(-8, 8, (6, k), dtype=torch.int8, generator=g)
    groups = 1 if group_size <= 0 else -(-k // group_size)
    s = torch.rand(6, groups, generator=g) * 0.05 + 1e-3
    s = torch.where(torch.rand(6, groups, generator=g) < 0.5, -s, s).half()  # either sign (--weight-scale-sign signed)
    packed = pack_q4_0(q, s, group_size)
    assert packed.shape == (6, k // 32 * 18) and packed.dtype == torch.uint8
    deq = gguf.quants.dequantize(packed.numpy(), gguf.GGMLQuantizationType.Q4_0)
    assert np.array_equal(deq, dequantize_weight(q, s, group_size).numpy())
    codes, d = unpack_q4_0(packed, k)
    assert torch.equal(codes, q)
    gs = k if group_size <= 0 else group_size
    assert torch.equal(d, s.repeat_interleave(gs // 32, dim=1)[:, : k // 32])


def test_pack_q4_0_matches_gguf_quantizer_bytes():
    """Where gguf's Q4_0 quantizer has a unique answer (each block's largest magnitude is code -8, so its d is the
    scale), it writes the same bytes as pack_q4_0."""
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-7, 8, (4, 128), dtype=torch.int8, generator=g)
    q[:, ::32] = -8
    s = (torch.rand(4, 2, generator=g) + 0.5).half()
    w = dequantize_weight(q, s, 64).numpy()
    want = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_0)
    assert np.array_equal(pack_q4_0(q, s, 64).numpy(), want)


@pytest.mark.parametrize("k,group_size,msg", [(64, 16, "group size 16"), (48, -1, "in_features 48"),
                                              (96, 48, "group size 48")])
def test_pack_q4_0_refuses_what_it_would_round(k, group_size, msg):
    q = torch.zeros(2, k, dtype=torch.int8)
    groups = 1 if group_size <= 0 else -(-k // group_size)
    with pytest.raises(ValueError, match=msg):
        pack_q4_0(q, torch.ones(2, groups, dtype=torch.float16), group_size)
    with pytest.raises(ValueError, match="float16"):
        pack_q4_0(torch.zeros(2, 64, dtype=torch.int8), torch.ones(2, 2), 32)


def test_rope_rows_to_ggml_pairs_the_two_halves_of_each_head():
    t = torch.arange(2 * 8).view(16, 1)  # 2 heads of 8 rows
    got = rope_rows_to_ggml(t, 2).flatten().tolist()
    assert got == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]
    assert torch.equal(_from_ggml_rows(rope_rows_to_ggml(t, 2), 2), t)


# ------------------------------------------------------------------------------------ the file, read back
def test_q4_0_codes_scales_norms_read_back_bit_for_bit(llama_export):
    src, plan, out = llama_export["src"], llama_export["plan"], llama_export["out"]
    ref = fptq.load(src, backend="reference")
    tensors = _tensors(out)
    cfg = ref.config
    for name in plan.layers:
        i, proj = int(name.split(".")[2]), name.rsplit(".", 1)[-1]
        gname = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                 "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[proj]
        t = tensors[f"blk.{i}.{gname}.weight"]
        assert t.tensor_type == gguf.GGMLQuantizationType.Q4_0
        m = ref.get_submodule(name)
        codes, d = _decode_q4_0(t.data, m.out_features, m.in_features)
        heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}.get(proj)
        if heads:  # LLaMA: q/k rows are in GGML's RoPE order
            codes, d = _from_ggml_rows(codes, heads), _from_ggml_rows(d, heads)
        assert torch.equal(codes, m.codes()), name
        assert torch.equal(d.view(torch.int16), m.w_scales.view(torch.int16)), name  # group 32: one scale a block
    for i, layer in enumerate(ref.model.layers):
        for norm, gname in (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm")):
            t = tensors[f"blk.{i}.{gname}.weight"]
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
            assert torch.equal(torch.from_numpy(np.array(t.data)), getattr(layer, norm).weight.float())
    emb = tensors["token_embd.weight"]
    assert emb.tensor_type == gguf.GGMLQuantizationType.F16
    assert torch.equal(torch.from_numpy(np.array(emb.data)), ref.model.embed_tokens.weight.half())
    assert tensors["output.weight"].tensor_type == gguf.GGMLQuantizationType.F16  # untied lm_head


def test_metadata_and_tokenizer_converted_from_hugging_face(llama_export):
    fields = _fields(llama_export["out"])
    tok = make_tokenizer()
    vocab = tok.get_vocab()
    assert fields["general.architecture"] == "llama"
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_0
    assert fields["llama.block_count"] == 2 and fields["llama.embedding_length"] == 64
    assert fields["llama.attention.head_count_kv"] == 2 and fields["llama.rope.dimension_count"] == 16
    assert fields["fptq.method"] == "fptq" and fields["fptq.group_size"] == 32
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get)
    assert fields["tokenizer.ggml.eos_token_id"] == vocab["</s>"]
    assert len(fields["tokenizer.ggml.merges"]) == len(json.loads(tok.backend_tokenizer.to_str())["model"]["merges"])
    types = fields["tokenizer.ggml.token_type"]
    assert types[vocab["<s>"]] == gguf.TokenType.CONTROL and types[max(vocab.values())] == gguf.TokenType.NORMAL


def test_report_lists_types_sizes_and_dropped_scales(llama_export):
    rep = json.loads(report_path(llama_export["out"]).read_text())
    plan = llama_export["plan"]
    sizes = rep["sizes"]
    assert sizes["by_type"]["Q4_0"]["tensors"] == 14 and sizes["bits_per_weight"]["q4_0_tensors"] == 4.5
    assert sizes["file_bytes"] == llama_export["out"].stat().st_size == rep["files"]["model.gguf"]["bytes"]
    static = [n for n, lp in plan.layers.items() if lp.strategy in ("static_tensor", "lae_static_tensor")]
    assert sorted(n for n, lay in rep["layers"].items() if "dropped_static_act_scale" in lay) == sorted(static)
    assert rep["kept"]["layers_with_folded_equalization"] and rep["rope_rows_reordered"] == ["q_proj", "k_proj"]
    assert rep["metadata"]["kind"] == "hf" and rep["embeddings"] == rep["output"] == "F16"


def test_transformers_reads_the_gguf_as_fptqs_float_activation_model(llama_export):
    """transformers' GGUF loader (which undoes llama.cpp's q/k row order) gives back fptq's dequantized weights bit
    for bit, and the logits of fptq's model with float activations."""
    from transformers import AutoModelForCausalLM

    out = llama_export["out"]
    hf = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32)
    ref = _float_activations(fptq.load(llama_export["src"], backend="reference"))
    for name in llama_export["plan"].layers:
        assert torch.equal(hf.get_submodule(name).weight, ref.get_submodule(name).dequantized_weight()), name
    with torch.no_grad():
        got, want = hf(IDS).logits, ref(IDS).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("group_size", [64, 128, -1])
def test_groups_longer_than_32_repeat_their_scale_exactly(tmp_path, group_size):
    """Qwen2 (biases, tied embeddings, no q/k reordering) quantized with groups of 64, 128 (a single ragged group
    of 64 / 96 here) and per channel: every Q4_0 block of a group carries the group's scale."""
    from transformers import AutoModelForCausalLM

    src, plan = _checkpoint(tmp_path / "src", family="qwen2", method="rtn-w4a16", group_size=group_size)
    out = export(src, tmp_path / "q.gguf", "gguf", progress=False)
    ref = fptq.load(src, backend="reference")
    tensors = _tensors(out)
    assert "output.weight" not in tensors  # tied: llama.cpp reads token_embd
    for name in plan.layers:
        m = ref.get_submodule(name)
        i, proj = int(name.split(".")[2]), name.rsplit(".", 1)[-1]
        gname = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                 "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[proj]
        codes, d = _decode_q4_0(tensors[f"blk.{i}.{gname}.weight"].data, m.out_features, m.in_features)
        gs = m.in_features if group_size <= 0 else group_size
        assert torch.equal(codes, m.codes()), name
        want = m.w_scales.repeat_interleave(gs // 32, dim=1)[:, : m.in_features // 32]
        assert torch.equal(d.view(torch.int16), want.view(torch.int16)), name
        if proj in ("q_proj", "k_proj", "v_proj"):
            bias = tensors[f"blk.{i}.{gname}.bias"]
            assert bias.tensor_type == gguf.GGMLQuantizationType.F32
            assert torch.equal(torch.from_numpy(np.array(bias.data)), m.bias.float())
    assert _fields(out)["general.architecture"] == "qwen2"
    hf = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32)
    with torch.no_grad():
        assert torch.allclose(hf(IDS).logits, _float_activations(ref)(IDS).logits, atol=1e-5, rtol=0)


def test_embeddings_and_output_types(llama_export, tmp_path):
    """Q8_0 / Q4_0 embeddings are the gguf package's quantization of the checkpoint's (llama.cpp's reference
    quantizers); --gguf-output sets the untied lm_head apart; bf16 keeps the stored values."""
    ref = fptq.load(llama_export["src"], backend="reference")
    emb = ref.model.embed_tokens.weight.detach().float().numpy()
    head = ref.lm_head.weight.detach().float().numpy()
    q = export(llama_export["src"], tmp_path / "q.gguf", "gguf", embeddings="q4_0", output="q8_0", progress=False)
    tensors = _tensors(q)
    for name, w, kind in (("token_embd.weight", emb, "Q4_0"), ("output.weight", head, "Q8_0")):
        qtype = getattr(gguf.GGMLQuantizationType, kind)
        assert tensors[name].tensor_type == qtype
        assert np.array_equal(np.array(tensors[name].data), gguf.quants.quantize(w, qtype))
    rep = json.loads(report_path(q).read_text())
    assert (rep["embeddings"], rep["output"]) == ("Q4_0", "Q8_0")
    bf = export(llama_export["src"], tmp_path / "bf.gguf", "gguf", embeddings="bf16", progress=False)
    t = _tensors(bf)["output.weight"]
    assert t.tensor_type == gguf.GGMLQuantizationType.BF16
    back = gguf.quants.dequantize(np.array(t.data), gguf.GGMLQuantizationType.BF16)
    assert np.array_equal(back, ref.lm_head.weight.detach().float().numpy())  # the checkpoint's bfloat16 values exactly


def test_float_model_as_f16_gguf(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = export_float_gguf(tiny_model_dir, tmp_path / "f16.gguf", progress=False)
    tensors = _tensors(out)
    assert {t.tensor_type.name for t in tensors.values()} == {"F16", "F32"}
    assert _fields(out)["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    hf = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32)
    want = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        assert sqnr_db(want(IDS).logits, hf(IDS).logits) > 50  # float16 rounding of the matrices only


# --------------------------------------------------------------------------------- metadata from a source GGUF
def test_metadata_copied_from_the_source_gguf(tiny_model_dir, calib_file, tmp_path):
    """A model converted from GGUF records its file (fptq_source.json); the export copies that file's metadata and
    tokenizer keys, type for type, and rewrites only the file type."""
    from fptq.workflow import quantize_to_dir

    source = export_float_gguf(tiny_model_dir, tmp_path / "source.gguf", progress=False)
    (tiny_model_dir / "fptq_source.json").write_text(json.dumps({"gguf": str(source)}))
    ckpt = tmp_path / "ckpt"
    quantize_to_dir(str(tiny_model_dir), ckpt, fptq.method_config("rtn-w4a16", group_size=32), calib=str(calib_file),
                    nsamples=2, seqlen=32, progress=False)
    out = export(ckpt, tmp_path / "m.gguf", "gguf", progress=False)
    rep = json.loads(report_path(out).read_text())
    assert rep["metadata"]["kind"] == "gguf" and rep["metadata"]["path"] == str(source)
    want, got = _fields(source), _fields(out)
    assert got["general.name"] == want["general.name"] == tiny_model_dir.name
    for key, value in want.items():
        if key.startswith(("tokenizer.", "llama.")) or key == "general.name":
            assert got[key] == value, key
    assert got["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_0
    hf_meta = export(ckpt, tmp_path / "hf.gguf", "gguf", metadata="hf", progress=False)
    assert json.loads(report_path(hf_meta).read_text())["metadata"]["kind"] == "hf"


def test_source_gguf_of_another_model_is_refused(llama_export, tmp_path):
    model = tiny_llama(num_hidden_layers=3)
    model.save_pretrained(tmp_path / "other")
    make_tokenizer().save_pretrained(tmp_path / "other")
    other = export_float_gguf(tmp_path / "other", tmp_path / "other.gguf", progress=False)
    with pytest.raises(fptq.FptqError, match=r"does not describe this checkpoint's model \(llama.block_count = 3"):
        export(llama_export["src"], tmp_path / "m.gguf", "gguf", metadata=other, progress=False)
    assert not (tmp_path / "m.gguf").exists()


def test_pre_tokenizer_names():
    assert bpe_pre_tokenizer({"pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}) == "gpt-2"
    smollm = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                    {"type": "ByteLevel", "use_regex": True}]}
    assert bpe_pre_tokenizer({"pre_tokenizer": smollm}) == "smollm"
    assert bpe_pre_tokenizer({"pre_tokenizer": {"type": "Metaspace"}}) is None


# ------------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("method,group_size,msg", [
    ("rtn-w4a16", 16, r"group size 16 is not a multiple of 32.*--group-size 32"),
    ("rtn-w4a16", 48, r"group size 48 is not a multiple of 32.*--group-size 32"),
    ("smoothquant-w8a8", 32, r"8-bit weights do not fit Q4_0.*--group-size 32"),
])
def test_weights_q4_0_cannot_hold_are_refused(tmp_path, method, group_size, msg):
    src, _ = _checkpoint(tmp_path / "src", method=method, group_size=group_size)
    with pytest.raises(fptq.FptqError, match=msg):
        export(src, tmp_path / "m.gguf", "gguf")
    assert list(tmp_path.iterdir()) == [tmp_path / "src"]  # nothing written


def test_unmapped_family_is_refused(tmp_path):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(vocab_size=300, hidden_size=64, ffn_dim=96, num_hidden_layers=2,
                                     num_attention_heads=4, word_embed_proj_dim=64)).eval()
    plan = fptq.quantize(model, fptq.method_config("rtn-w4a16", group_size=32), CALIB, device="cpu", progress=False)
    src = fptq.save(model, plan, tmp_path / "src")
    with pytest.raises(fptq.FptqError, match="model type 'opt' to GGUF: llama.cpp has no OPT architecture"):
        export(src, tmp_path / "m.gguf", "gguf")


def test_a_runtime_input_transform_is_refused(tmp_path):
    """A quantized Linear whose checkpoint holds anything beyond codes, scales, activation scale and bias (e.g. a
    per-channel input scale applied at run time) cannot become a plain GGUF matrix."""
    model = tiny_llama()
    plan = fptq.quantize(model, fptq.method_config("rtn-w4a16", group_size=32), CALIB, device="cpu", progress=False)
    model.model.layers[0].mlp.down_proj.register_buffer("input_scale", torch.ones(96))
    src = fptq.save(model, plan, tmp_path / "src")
    with pytest.raises(fptq.FptqError, match=r"model\.layers\.0\.mlp\.down_proj holds a tensor 'input_scale'"):
        export(src, tmp_path / "m.gguf", "gguf")


def test_equalization_not_folded_into_the_checkpoint_is_refused(llama_export, tmp_path):
    """A plan whose equalization names a producer the checkpoint lacks (it would have to be applied at run time)
    cannot be exported."""
    import shutil

    src = tmp_path / "src"
    shutil.copytree(llama_export["src"], src)
    plan = json.loads((src / "fptq_plan.json").read_text())
    name, lp = next((n, lp) for n, lp in plan["layers"].items() if lp.get("equalization", "none") != "none")
    lp["equalization_folded_into"] = "model.layers.0.runtime_smoother"
    (src / "fptq_plan.json").write_text(json.dumps(plan))
    with pytest.raises(fptq.FptqError, match=rf"{name}: its lae equalization is not recorded as folded"):
        export(src, tmp_path / "m.gguf", "gguf")


def test_failure_while_writing_leaves_nothing(tmp_path):
    """An embedding float16 cannot hold is found while the data is written: no file, no leftovers; bf16 works."""
    model = tiny_llama()
    with torch.no_grad():
        model.model.embed_tokens.weight[5, 3] = 1e5
    plan = fptq.quantize(model, fptq.method_config("rtn-w4a16", group_size=32), CALIB, device="cpu", progress=False)
    src = fptq.save(model, plan, tmp_path / "src", tokenizer=make_tokenizer())
    with pytest.raises(fptq.FptqError, match="beyond float16's range.*bf16"):
        export(src, tmp_path / "m.gguf", "gguf", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    assert export(src, tmp_path / "m.gguf", "gguf", embeddings="bf16", progress=False).is_file()


def test_cli_summary_and_existing_output(llama_export, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"precious")
    args = ["export", str(llama_export["src"]), "--format", "gguf", "-o", str(out)]
    assert main(args) == 2
    assert "--force" in capsys.readouterr().err and out.read_bytes() == b"precious"
    assert main(args + ["--force", "--gguf-embeddings", "q8_0"]) == 0
    text = capsys.readouterr().out
    assert "14 Linears as Q4_0" in text and "Q4_0 tensors 4.50" in text and "embeddings Q8_0, output Q8_0" in text
    assert "static per-tensor scale" in text and report_path(out).is_file()
    assert main(args + ["--force", "--activations", "int8"]) == 2
    assert "--activations and --max-shard-size apply to --format compressed-tensors" in capsys.readouterr().err
    assert main(["export", str(llama_export["src"]), "-o", str(tmp_path / "ct"), "--gguf-embeddings", "q8_0"]) == 2
    assert "apply to --format gguf" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ llama.cpp
def _llama_cpp(job: dict, tmp_path) -> dict:
    jp, op = tmp_path / "job.json", tmp_path / "out.json"
    jp.write_text(json.dumps(job))
    subprocess.run([LLAMA_PYTHON, str(WORKER), str(jp), str(op)], check=True, timeout=600)
    return json.loads(op.read_text())


@pytest.mark.skipif(not LLAMA_PYTHON, reason="llama.cpp not available: set FPTQ_LLAMA_CPP_PYTHON to the python of a "
                                            "venv with llama-cpp-python (../shared/tools/build-llama-cpp-python VENV)")
def test_llama_cpp_runs_the_export(llama_export, tmp_path):
    """llama.cpp loads the file, tokenizes as the Hugging Face tokenizer does, and its logits agree with fptq's model
    with float activations to within its own activation quantization (Q8_0, 32 values per scale) and float16 KV
    cache: 38 dB SQNR measured on this tiny random model (fptq's all-dynamic per-token model: 36 dB)."""
    text = "The quick brown fox jumps over the lazy dog."
    ids = make_tokenizer()(text, add_special_tokens=False).input_ids
    res = _llama_cpp({"op": "logits", "gguf": str(llama_export["out"]), "ids": ids, "text": text,
                      "npy": str(tmp_path / "logits.npy")}, tmp_path)
    assert res["tokens"] == ids
    got = torch.from_numpy(np.load(tmp_path / "logits.npy"))
    ref = fptq.load(llama_export["src"], backend="reference")
    with torch.no_grad():
        want = _float_activations(ref)(torch.tensor([ids])).logits[0]
    assert sqnr_db(want, got) > 30
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9


def test_worker_is_not_imported_by_fptq():
    """The llama.cpp worker runs in its own venv: fptq never imports llama_cpp."""
    assert "llama_cpp" not in sys.modules
    src = (ROOT / "src" / "fptq").rglob("*.py")
    assert not [p for p in src if "llama_cpp" in p.read_text()]


def test_rotated_tied_model_exports_with_its_own_output_tensor(tmp_path):
    """A rotated model (QuantConfig.rotation: norms folded, lm_head untied from the tied embedding) is a plain
    model to the GGUF writer: an `output` tensor beside `token_embd`, and transformers' GGUF loader gives back
    fptq's model with float activations."""
    from transformers import AutoModelForCausalLM

    model = _tiny_qwen2()
    cfg = fptq.method_config("fptq", group_size=32, thresholds=(2.0, 20.0), rotation="residual")
    plan = fptq.quantize(model, cfg, CALIB, device="cpu", progress=False)
    src = fptq.save(model, plan, tmp_path / "src", tokenizer=make_tokenizer())
    out = export(src, tmp_path / "model.gguf", "gguf", progress=False)
    assert {"output.weight", "token_embd.weight"} <= set(_tensors(out))
    hf = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32)
    ref = _float_activations(fptq.load(src, backend="reference"))
    with torch.no_grad():
        assert torch.allclose(hf(IDS).logits, ref(IDS).logits, atol=1e-4, rtol=0)
