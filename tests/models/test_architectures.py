"""Every architecture of the adapter table (and the generic LLaMA-shaped path) on
tiny random models built from transformers' own config classes: the folds are
exact, the layer-by-layer replay reproduces the model (per-layer masks and
rotary tables included), and quantize -> save -> load is bit-exact."""
from __future__ import annotations

import copy
import logging

import pytest
import torch

import fptq
from fptq.calibrate import capture_layer0_inputs, run_layer
from fptq.config import ActPolicy, Equalization
from fptq.models import attention_heads, get_adapter
from fptq.models.adapters import llama_shape_problem
from fptq.models.loading import check_architecture
from fptq.nn import QuantLinear
from fptq.folding import equalization_scales as _equalization_scales, fold_group as _fold
from fptq.workflow import quantize_to_dir

from ..conftest import as_stored, make_tokenizer, sqnr_db

VOCAB = 300
CPU = torch.device("cpu")
SMALL = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4)


def _gemma(kind: str):
    import transformers as tf

    common = dict(SMALL, intermediate_size=96, num_key_value_heads=2, head_dim=16, max_position_embeddings=128)
    if kind == "gemma":
        return tf.GemmaForCausalLM(tf.GemmaConfig(**common, num_hidden_layers=2))
    if kind == "gemma2":  # layer 0 sliding (window 8 < seqlen), layer 1 global
        return tf.Gemma2ForCausalLM(tf.Gemma2Config(**common, num_hidden_layers=2, sliding_window=8))
    return tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(  # local and global layers, with different rotary tables
        **common, num_hidden_layers=3, sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"]))


def _opt(**kw):
    from transformers import OPTConfig, OPTForCausalLM

    base = dict(SMALL, ffn_dim=96, num_hidden_layers=2, word_embed_proj_dim=64, max_position_embeddings=128)
    base.update(kw)
    return OPTForCausalLM(OPTConfig(**base))


def _bloom(**kw):
    from transformers import BloomConfig, BloomForCausalLM

    return BloomForCausalLM(BloomConfig(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4, **kw))


def _granite():
    from transformers import GraniteConfig, GraniteForCausalLM

    return GraniteForCausalLM(GraniteConfig(**SMALL, intermediate_size=96, num_hidden_layers=2, num_key_value_heads=2,
                                            embedding_multiplier=4.0, residual_multiplier=0.5,
                                            attention_multiplier=0.2, logits_scaling=2.0, tie_word_embeddings=False))


def _llama_like():
    """A LLaMA-shaped model of a model type transformers does not know (in-memory only)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    class MyLlamaConfig(LlamaConfig):
        model_type = "my_llama"

    return LlamaForCausalLM(MyLlamaConfig(**SMALL, intermediate_size=96, num_hidden_layers=2, num_key_value_heads=2,
                                          tie_word_embeddings=False))


BUILDERS = {
    "gemma": lambda: _gemma("gemma"),
    "gemma2": lambda: _gemma("gemma2"),
    "gemma3_text": lambda: _gemma("gemma3_text"),
    "opt": lambda: _opt(),
    "opt-post-ln": lambda: _opt(do_layer_norm_before=False, word_embed_proj_dim=32),  # with project_in/out
    "bloom": lambda: _bloom(),
    "granite": _granite,  # generic: a real model type outside the table
    "my_llama": _llama_like,  # generic: unknown to transformers too
}
SAVEABLE = [k for k in BUILDERS if k != "my_llama"]  # fptq.load needs a model type transformers knows


def tiny(arch: str, seed: int = 0):
    """A tiny random model with outlier channels in the norms that feed Linears, so that
    the three strategies all occur at small thresholds; LayerNorms get random biases."""
    torch.manual_seed(seed)
    model = BUILDERS[arch]().eval()
    adapter = get_adapter(model)
    off = adapter.norm_weight_offset
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in adapter.layers(model):
            norms = [grp.producer for grp in adapter.groups if grp.kind == "norm"]
            if not norms:  # post-LN: give the norms outliers anyway
                norms = sorted({n for n, m in layer.named_children() if "norm" in n})
            for k, name in enumerate(norms):
                norm = layer.get_submodule(name)
                gain = torch.rand(norm.weight.shape, generator=g) + 0.5
                gain[k * 5: k * 5 + 3] *= 8 if k == 0 else 30
                norm.weight.copy_(gain - off)
                if getattr(norm, "bias", None) is not None:
                    norm.bias.copy_((torch.rand(norm.bias.shape, generator=g) - 0.5) * 0.2)
        if arch == "bloom":  # larger values in layer 1: its self_attention.dense falls in the LAE band
            qkv = model.transformer.h[1].self_attention.query_key_value
            qkv.weight.view(4, 3, 16, 64)[:, 2] *= 10
            qkv.bias.view(4, 3, 16)[:, 2] *= 10
    return model


def ids(n=4, s=24, seed=0):
    return torch.randint(0, VOCAB, (n, s), generator=torch.Generator().manual_seed(seed))


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


# ------------------------------------------------------------------------------------------ adapters


def test_table_and_generic_adapters():
    assert get_adapter(tiny("gemma2")).norm_weight_offset == 1.0
    assert get_adapter(tiny("gemma3_text")).name == "gemma3"
    assert get_adapter(tiny("opt")).layers_path == "model.decoder.layers"
    assert get_adapter(tiny("bloom")).layers_path == "transformer.h"
    for arch in ("granite", "my_llama"):
        a = get_adapter(tiny(arch))
        assert a.generic and a.model_types == (arch,) and a.groups == get_adapter("llama").groups
    assert not get_adapter(tiny("gemma")).generic


def test_pre_modules_skip_absent_ones():
    m = tiny("opt")
    assert get_adapter(m).present_pre_modules(m) == ("model.decoder.embed_tokens", "model.decoder.embed_positions")
    m = tiny("opt-post-ln")  # word_embed_proj_dim != hidden_size: project_in runs before the first layer
    assert get_adapter(m).present_pre_modules(m)[-1] == "model.decoder.project_in"


def test_unknown_architecture_that_is_not_llama_shaped_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel, OlmoConfig, OlmoForCausalLM

    m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(fptq.FptqError, match="unsupported architecture 'gpt2'; fptq supports: llama, mistral, qwen2, "
                                             "qwen3, gemma, gemma2, gemma3_text, opt, bloom"):
        get_adapter(m)
    # OLMo's layers are named like LLaMA's, but its LayerNorms have no weight to fold into
    olmo = OlmoForCausalLM(OlmoConfig(**SMALL, intermediate_size=96, num_hidden_layers=1))
    assert "has the parts ['mlp', 'self_attn']" in llama_shape_problem(olmo)
    with pytest.raises(fptq.FptqError, match="unsupported architecture 'olmo'.*this one is not"):
        get_adapter(olmo)


def test_config_check_uses_a_meta_skeleton_for_unknown_types():
    from transformers import BertConfig, GraniteConfig

    assert check_architecture(GraniteConfig(**SMALL, intermediate_size=96, num_hidden_layers=1)).generic
    with pytest.raises(fptq.FptqError, match="unsupported architecture 'bert'"):
        check_architecture(BertConfig(hidden_size=32, num_attention_heads=2, intermediate_size=64, num_hidden_layers=1))


def test_generic_path_logs_a_warning_naming_the_model_type(caplog):
    model = tiny("my_llama")
    with caplog.at_level(logging.WARNING, logger="fptq.pipeline"):
        fptq.quantize(model, fptq.method_config("rtn-w4a16", group_size=32), ids(2, 8), device="cpu", progress=False)
    assert any("'my_llama'" in r.getMessage() and "LLaMA table" in r.getMessage() for r in caplog.records)


def test_generic_path_refuses_to_fold_into_a_norm_it_misreads():
    """A LLaMA-shaped model whose norms scale by 1 + weight (like Gemma's): the fold check catches it."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    model = tiny("my_llama")
    with torch.no_grad():
        for layer in model.model.layers:
            norm = GemmaRMSNorm(64)
            norm.weight.copy_(layer.input_layernorm.weight)
            layer.input_layernorm = norm
    cfg = fptq.method_config("lae-dynamic-w4a8", group_size=32)
    with pytest.raises(fptq.FptqError, match=r"model\.layers\.0\.input_layernorm .*does not scale its output"):
        fptq.quantize(model, cfg, ids(2, 8), device="cpu", progress=False)


def test_opt_and_bloom_configs_that_change_the_folds():
    post = get_adapter(tiny("opt-post-ln"))
    assert [g.kind for g in post.groups] == ["none", "linear", "none", "linear"]
    assert "post-LN" in post.groups[0].note
    gelu = get_adapter(_opt(activation_function="gelu"))
    assert [g.kind for g in gelu.groups] == ["norm", "linear", "norm", "none"]
    bloom = get_adapter(_bloom(apply_residual_connection_post_layernorm=True))
    assert [g.kind for g in bloom.groups] == ["none", "fused_qkv_v", "none", "none"]
    with pytest.raises(fptq.FptqError, match="slow_but_exact"):
        get_adapter(_bloom(pretraining_tp=2, slow_but_exact=True))


def test_16_bit_gemma_norm_folds_warn_about_rounding(caplog):
    """Gemma's norms store (1 + w) / s - 1: in bfloat16 the small gains of strongly scaled
    channels lose precision, and fptq says so (float32 folds stay silent)."""
    for dtype, warned in ((torch.float32, False), (torch.bfloat16, True)):
        model = tiny("gemma2").to(dtype)
        adapter = get_adapter(model)
        s = torch.full((64,), 20.0)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="fptq.pipeline"):
            _fold(adapter, adapter.groups[0], model.model.layers[0], "model.layers.0", s, s, (4, 2))
        assert any("input_layernorm: storing the folded weight" in r.getMessage() for r in caplog.records) == warned


# ------------------------------------------------------------------------------------- folds, replay


@pytest.mark.parametrize("arch", list(BUILDERS))
@pytest.mark.parametrize("eq", ["lae", "smoothquant"])
def test_folding_every_group_leaves_float_logits_unchanged(arch, eq):
    model = tiny(arch)
    x = ids()
    ref = _logits(model, x)
    adapter = get_adapter(model)
    heads = attention_heads(model)
    cfg = fptq.method_config("fptq", equalization=eq)
    g = torch.Generator().manual_seed(3)
    folded = 0
    for i, layer in enumerate(adapter.layers(model)):
        for grp in adapter.groups:
            if not grp.foldable:
                continue
            k = layer.get_submodule(grp.consumers[0]).in_features
            absmax = torch.exp(torch.rand(k, generator=g) * 6)  # 1 .. 400
            s_in, s_out = _equalization_scales(cfg, grp, layer, absmax, heads)
            assert float(s_in.max() / s_in.min()) > 5  # the scales are far from uniform
            _fold(adapter, grp, layer, f"layer{i}", s_in, s_out, heads)
            folded += 1
    assert folded >= 2 * len(adapter.layers(model))
    torch.testing.assert_close(_logits(model, x), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_layer_by_layer_replay_reproduces_every_layer(arch):
    """Captured inputs + per-layer kwargs (masks, rotary tables, ALiBi) replayed one layer at a time
    give each layer's output in the full forward exactly."""
    model = tiny(arch)
    x = ids(5, 24)
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    full = []
    hooks = [lay.register_forward_hook(lambda m, a, o: full.append(o[0] if isinstance(o, tuple) else o))
             for lay in layers]
    _logits(model, x)
    for h in hooks:
        h.remove()
    inputs = capture_layer0_inputs(model, adapter, x, 2, CPU)  # batches of 2, 2 and 1
    assert [h.shape[0] for h in inputs.hidden] == [2, 2, 1]
    for i, layer in enumerate(layers):
        assert inputs.layer_index == i
        run_layer(layer, inputs, CPU, replace=True)
        assert torch.equal(torch.cat(inputs.hidden), full[i]), f"layer {i}"
    if arch in ("gemma2", "gemma3_text"):
        # sliding-window and global layers get different masks (and rotary tables): replaying
        # layer 0's arguments for every layer would not reproduce the model
        assert inputs.layer_kwargs is not None
        assert inputs.layer_kwargs[1][0]["attention_mask"] is not inputs.layer_kwargs[0][0]["attention_mask"]
        wrong = capture_layer0_inputs(model, adapter, x, 2, CPU)
        wrong.layer_kwargs = None
        for layer in layers:
            run_layer(layer, wrong, CPU, replace=True)
        assert not torch.allclose(torch.cat(wrong.hidden), full[-1], atol=1e-3)
    else:
        assert inputs.layer_kwargs is None  # every layer gets the same arguments: stored once
    if arch == "bloom":
        assert inputs.kwargs[0]["alibi"].shape[0] == 2 * 4 and inputs.kwargs[2]["alibi"].shape[0] == 1 * 4


# ------------------------------------------------------------------------------ quantize, save, load


FPTQ = dict(group_size=32, thresholds=(2.0, 36.0))


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_quantize_save_load_is_bit_exact_and_close_to_float(arch, tmp_path):
    model = tiny(arch)
    calib = ids(6, 24)
    x = ids(2, 16, seed=5)
    ref = _logits(model, x)
    weight_only = copy.deepcopy(model)  # the tiny random models are sensitive to 4-bit weights alone
    fptq.quantize(weight_only, fptq.method_config("rtn-w4a16", group_size=32), calib, device="cpu", progress=False)
    floor = min(8.0, sqnr_db(ref, _logits(weight_only, x)) - 2)
    plan = fptq.quantize(model, fptq.method_config("fptq", **FPTQ), calib, device="cpu", progress=False,
                         batch_size=4)
    adapter = get_adapter(model)
    n_linears = len(adapter.quantizable_linears(adapter.layers(model)[0]))
    assert len(plan.layers) == n_linears * len(adapter.layers(model))
    counts = plan.counts()
    expected = {"static_tensor", "dynamic_token"} | ({"lae_static_tensor"} if arch != "opt-post-ln" else set())
    assert expected <= set(counts), counts
    for name, lp in plan.layers.items():
        assert isinstance(model.get_submodule(name), QuantLinear)
        if lp.strategy == "lae_static_tensor":
            assert lp.equalization == "lae" and lp.equalization_folded_into
            assert lp.act_absmax_equalized < lp.act_absmax or lp.equalization_power == 0  # power 0: unscaled
        if lp.equalization_note and not lp.chosen_dynamic:  # an unfoldable group (not the dynamic budget's note):
            # no equalization; in the LAE band it falls back to dynamic
            assert lp.equalization == "none" and lp.strategy != "lae_static_tensor"
            assert lp.strategy == "dynamic_token" or lp.act_absmax < 2.0, (name, lp)
    out = _logits(model, x)
    assert sqnr_db(ref, out) > max(floor, 4.0), (sqnr_db(ref, out), floor)
    if arch not in SAVEABLE:
        return
    fptq.save(model, plan, tmp_path / "q")
    loaded = fptq.load(tmp_path / "q", backend="reference")
    assert torch.equal(_logits(loaded, x), _logits(as_stored(model), x))  # unquantized tensors stored in 16 bits
    assert loaded.fptq_plan.to_dict()["layers"] == plan.to_dict()["layers"]


def test_bloom_value_rows_of_the_fused_qkv_are_folded_exactly():
    """With W8 per-channel weights and dynamic activations, LAE through the fused QKV (BLOOM's
    interleaved heads) keeps the model as close to float as no equalization does."""
    model = tiny("bloom")
    x = ids()
    ref = _logits(model, x)
    out = {}
    for eq in ("lae", "none"):
        m = copy.deepcopy(model)
        cfg = fptq.QuantConfig(method="t", wbits=8, abits=8, group_size=-1, act_policy=ActPolicy.DYNAMIC,
                               equalization=Equalization(eq))
        plan = fptq.quantize(m, cfg, x, device="cpu", progress=False)
        out[eq] = sqnr_db(ref, _logits(m, x))
        if eq == "lae":
            dense = plan.layers["transformer.h.0.self_attention.dense"]
            assert dense.equalization_folded_into == "transformer.h.0.self_attention.query_key_value"
            assert plan.layers["transformer.h.0.mlp.dense_4h_to_h"].equalization_note.startswith("not equalized")
    assert out["lae"] > 25 and out["none"] > 25, out


# --------------------------------------------------------------------------- from a saved directory


@pytest.mark.parametrize("arch", ["gemma3_text", "opt-post-ln", "bloom", "granite"])
def test_layer_by_layer_loading_matches_in_memory_api(arch, tmp_path, calib_file):
    """The CLI's path (weights streamed one decoder layer at a time from safetensors) gives the
    checkpoint the in-memory API gives."""
    d = tmp_path / "m"
    tiny(arch).save_pretrained(d, max_shard_size="100KB")
    make_tokenizer().save_pretrained(d)
    cfg = fptq.method_config("fptq", **FPTQ)
    settings = dict(nsamples=4, seqlen=24, device="cpu", progress=False)
    _, report = quantize_to_dir(str(d), tmp_path / "q", cfg, calib=str(calib_file), **settings)
    assert report["layer_by_layer_loading"] is True
    model, tok, _ = fptq.load_float_model(str(d))
    windows = fptq.calibration_windows(tok, fptq.read_text(str(calib_file)), 4, 24, 0)
    plan = fptq.quantize(model, cfg, windows, device="cpu", progress=False)
    loaded = fptq.load(tmp_path / "q", backend="reference")
    x = ids(2, 16, seed=7)
    assert torch.equal(_logits(loaded, x), _logits(as_stored(model), x))
    assert loaded.fptq_plan.to_dict()["layers"] == plan.to_dict()["layers"]
