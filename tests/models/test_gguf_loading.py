"""GGUF files are accepted by what transformers builds from them, not by their architecture name.

Each test writes a tiny GGUF file the way llama.cpp's converter does (its metadata keys, its tensor
names from the ``gguf`` package's own name map, its weight layouts: permuted LLaMA q/k rows, Gemma
norms stored as ``1 + w``, BLOOM's fused q/k/v split into three blocks), from a tiny random model
built with transformers. Support is then decided from the config transformers reads back (GGUF
``gemma3`` is transformers' ``gemma3_text``, a LLaMA file named ``mistral`` is ``mistral``), and a
converted file reproduces the model it was written from.
"""
from __future__ import annotations

import importlib.metadata
import json

import pytest
import torch

import fptq
from fptq.models.adapters import get_adapter
from fptq.models.loading import check_gguf, load_float_model, resolve_model_dir
from fptq.nn import QuantLinear
from fptq.workflow import quantize_to_dir

from ..conftest import make_tokenizer, write_tiny_gguf

gguf = pytest.importorskip("gguf")

SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=128)


def _family(name: str, vocab: int):
    """``(hf_model, gguf_arch, gguf_name, tensor_map_arch)`` of a tiny random model of family ``name``."""
    import transformers as tf

    torch.manual_seed(0)
    kv = dict(SMALL, vocab_size=vocab, num_key_value_heads=2)
    if name == "llama":  # an untied lm_head: written as output.weight
        return tf.LlamaForCausalLM(tf.LlamaConfig(**kv, tie_word_embeddings=False)), "llama", "tiny llama", "LLAMA"
    if name == "mistral":  # llama.cpp writes Mistral as a LLaMA file; transformers reads the name
        return tf.MistralForCausalLM(tf.MistralConfig(**kv, tie_word_embeddings=True)), "llama", "mistral", "LLAMA"
    if name == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**kv, tie_word_embeddings=True)), "qwen2", "tiny qwen2", "QWEN2"
    if name == "qwen3":  # transformers does not read Qwen3's head_dim from a GGUF: its default, 128
        return (tf.Qwen3ForCausalLM(tf.Qwen3Config(**kv, head_dim=128, tie_word_embeddings=True)), "qwen3",
                "tiny qwen3", "QWEN3")
    if name == "gemma2":
        return (tf.Gemma2ForCausalLM(tf.Gemma2Config(**kv, head_dim=16, sliding_window=8)), "gemma2",
                "tiny gemma2", "GEMMA2")
    if name == "gemma3":
        return (tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**kv, head_dim=16, sliding_window=8)), "gemma3",
                "tiny gemma3", "GEMMA3")
    if name == "bloom":
        return (tf.BloomForCausalLM(tf.BloomConfig(vocab_size=vocab, hidden_size=64, n_layer=2, n_head=4)), "bloom",
                "tiny bloom", "BLOOM")
    if name == "falcon":
        return (tf.FalconForCausalLM(tf.FalconConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2,
                                                     num_attention_heads=4)), "falcon", "tiny falcon", "FALCON")
    if name == "gpt2":
        return (tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                                 bos_token_id=1, eos_token_id=2)),
                "gpt2", "tiny gpt2", "GPT2")
    raise ValueError(name)


def _llama_cpp_layout(arch: str, name: str, w: torch.Tensor, cfg) -> torch.Tensor:
    """The tensor as llama.cpp's converter stores it (transformers undoes each of these when it reads)."""
    if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
        heads = cfg.num_attention_heads if "attn_q" in name else cfg.num_key_value_heads
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    if arch in ("gemma2", "gemma3") and name.endswith("norm.weight"):
        return w + 1  # llama.cpp stores Gemma's norms as the gain 1 + w
    if arch == "bloom" and ".attn_qkv." in name:  # per-head [q, k, v] rows -> [all q, all k, all v]
        n, d = cfg.n_head, cfg.hidden_size // cfg.n_head
        return w.reshape(n, 3, d, *w.shape[1:]).swapaxes(0, 1).reshape(w.shape)
    return w


def _metadata(w, arch: str, cfg) -> None:
    if arch == "bloom":
        w.add_block_count(cfg.n_layer)
        w.add_embedding_length(cfg.hidden_size)
        w.add_head_count(cfg.n_head)
        w.add_layer_norm_eps(cfg.layer_norm_epsilon)
        return
    if arch == "gpt2":
        w.add_block_count(cfg.n_layer)
        w.add_context_length(cfg.n_positions)
        w.add_embedding_length(cfg.n_embd)
        w.add_feed_forward_length(4 * cfg.n_embd)
        w.add_head_count(cfg.n_head)
        w.add_layer_norm_eps(cfg.layer_norm_epsilon)
        return
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_head_count(cfg.num_attention_heads)
    if arch == "falcon":
        w.add_feed_forward_length(cfg.ffn_hidden_size)
        w.add_head_count_kv(cfg.num_kv_heads)
        w.add_layer_norm_eps(cfg.layer_norm_epsilon)
        return
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rope = cfg.rope_parameters
    w.add_rope_freq_base(rope.get("full_attention", rope)["rope_theta"])  # Gemma 3: the global layers' base
    if arch == "llama":
        w.add_rope_dimension_count(cfg.head_dim)
    if arch in ("gemma2", "gemma3"):
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        w.add_sliding_window(cfg.sliding_window)


def _tokenizer_metadata(w, tok, sentencepiece: bool) -> None:
    """The tokenizer as llama.cpp writes it: byte-level BPE with merges (``tokenizer.ggml.model = gpt2``),
    or, as in Gemma files, a SentencePiece vocabulary (``llama``; spaces spelled ``▁``, no merges)."""
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    if sentencepiece:
        w.add_tokenizer_model("llama")
        w.add_token_list([t.replace("Ġ", "▁") for t in tokens])  # byte-level space -> SentencePiece's
        w.add_token_scores([-float(i) for i in range(len(tokens))])
    else:
        w.add_tokenizer_model("gpt2")
        w.add_token_list(tokens)
        w.add_token_merges([" ".join(m) if isinstance(m, list) else m
                            for m in json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]])
    w.add_token_types([3 if t in tok.all_special_tokens else 1 for t in tokens])  # 3: control
    w.add_bos_token_id(vocab[tok.bos_token])
    w.add_eos_token_id(vocab[tok.eos_token])
    w.add_unk_token_id(vocab[tok.unk_token])
    w.add_pad_token_id(vocab[tok.pad_token])


def write_gguf(path, family: str, tok):
    """Write a tiny GGUF of ``family`` to ``path``; returns the model it was written from."""
    model, arch, name, map_arch = _family(family, len(tok))
    cfg = model.config
    n_layers = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, map_arch), n_layers)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    _metadata(w, arch, cfg)
    w.add_vocab_size(len(tok))
    _tokenizer_metadata(w, tok, sentencepiece=arch.startswith("gemma"))
    tied = getattr(cfg, "tie_word_embeddings", False)
    for key, t in model.state_dict().items():
        if tied and key == "lm_head.weight":
            continue  # llama.cpp writes no output.weight for a tied lm_head
        base, _, suffix = key.rpartition(".")
        gname = names.get_name(base) or names.get_name(base.removeprefix("transformer."))  # as llama.cpp strips it
        assert gname is not None, f"no llama.cpp name for {key}"
        full = f"{gname}.{suffix}"
        w.add_tensor(full, _llama_cpp_layout(arch, full, t.detach().float(), cfg).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model.eval()


# GGUF architecture spelling -> the adapter fptq must choose (and the transformers model type behind it)
SUPPORTED = {
    "llama": ("llama", "llama"),
    "mistral": ("mistral", "mistral"),
    "qwen2": ("qwen2", "qwen2"),
    "qwen3": ("qwen3", "qwen3"),
    "gemma2": ("gemma2", "gemma2"),
    "gemma3": ("gemma3", "gemma3_text"),
    "bloom": ("bloom", "bloom"),
}


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FPTQ_CACHE", str(tmp_path / "cache"))


def test_every_supported_family_that_transformers_reads_from_gguf_is_covered():
    """Guards the list above: a family fptq supports and transformers reads from GGUF must be tested here."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    from fptq.models.adapters import supported_architectures

    readable = {a for a in GGUF_SUPPORTED_ARCHITECTURES if a in supported_architectures() or a == "gemma3"}
    assert readable <= set(SUPPORTED), readable - set(SUPPORTED)


@pytest.mark.parametrize("family", list(SUPPORTED))
def test_gguf_of_a_supported_family_gets_its_adapter(tmp_path, tok, family):
    path = tmp_path / f"{family}.gguf"
    write_gguf(path, family, tok)
    adapter_name, model_type = SUPPORTED[family]
    adapter = check_gguf(path)
    assert adapter.name == adapter_name and model_type in adapter.model_types and not adapter.generic


@pytest.mark.parametrize("family", list(SUPPORTED))
def test_gguf_converts_to_the_model_it_was_written_from(tmp_path, tok, family):
    path = tmp_path / f"{family}.gguf"
    ref = write_gguf(path, family, tok)
    if family == "mistral" and "mistral" not in gguf.MODEL_ARCH_NAMES.values():
        # transformers maps this file to model type mistral, then looks that name up in gguf-py's
        # architectures to place the tensors: gguf-py has none, so the conversion fails, clearly
        with pytest.raises(fptq.FptqError, match=r"cannot load GGUF file .*mistral\.gguf: Unknown gguf model_type"):
            load_float_model(str(path))
        pytest.skip(f"gguf {importlib.metadata.version('gguf')} has no 'mistral' architecture: transformers "
                    "cannot dequantize a GGUF it maps to mistral (fptq refuses it with a clear error)")
    model, tokenizer, src = load_float_model(str(path))
    assert model.config.model_type == SUPPORTED[family][1] == ref.config.model_type
    assert get_adapter(model).name == SUPPORTED[family][0]
    from transformers import AutoTokenizer  # the converted tokenizer is the one transformers reads from the file

    direct = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    text = "The quick brown fox jumps over the lazy dog."
    assert tokenizer(text).input_ids == direct(text).input_ids
    assert tokenizer.unk_token_id not in tokenizer(text).input_ids
    ids = torch.randint(0, len(tok), (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)


def test_gemma3_gguf_quantizes_end_to_end(tmp_path, tok, calib_file):
    """GGUF ``gemma3`` -> transformers ``gemma3_text`` -> fptq's Gemma 3 adapter -> a W4A8 checkpoint."""
    path = tmp_path / "gemma3.gguf"
    ref = write_gguf(path, "gemma3", tok)
    cfg = fptq.method_config("fptq", group_size=32, thresholds=(0.5, 20.0))
    plan, report = quantize_to_dir(str(path), tmp_path / "q", cfg, calib=str(calib_file), nsamples=4, seqlen=32,
                                   device="cpu", progress=False)
    assert json.loads((tmp_path / "q" / "config.json").read_text())["model_type"] == "gemma3_text"
    assert len(plan.layers) == 7 * ref.config.num_hidden_layers
    q = fptq.load(tmp_path / "q", backend="reference")
    assert sum(isinstance(m, QuantLinear) for m in q.modules()) == len(plan.layers)
    ids = torch.randint(0, len(tok), (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = ref(ids).logits, q(ids).logits
    rel = float((got - want).norm() / want.norm())
    assert rel < 0.5, rel  # close to the float model, and not the same: it is quantized
    assert rel > 0


@pytest.mark.parametrize("family", ["falcon", "gpt2"])
def test_gguf_that_transformers_reads_but_fptq_has_no_adapter_for_is_refused(tmp_path, tok, family):
    path = tmp_path / f"{family}.gguf"
    write_gguf(path, family, tok)
    with pytest.raises(fptq.FptqError, match=rf"GGUF file .*{family}.gguf \(architecture '{family}', transformers "
                       rf"model type '{family}'\): unsupported architecture '{family}'; fptq supports: llama, "
                       r"mistral, qwen2, qwen3, gemma, gemma2, gemma3_text, opt, bloom"):
        resolve_model_dir(str(path))
    assert not (tmp_path / "cache" / "models").exists() or not any((tmp_path / "cache" / "models").iterdir())


def test_gguf_that_transformers_cannot_read_is_refused(tmp_path):
    path = write_tiny_gguf(tmp_path / "rwkv.gguf", "rwkv6")
    with pytest.raises(fptq.FptqError, match=r"architecture 'rwkv6', which fptq does not support; fptq supports: "
                       r"llama, .*transformers \S+ cannot read this file's model config: GGUF model with "
                       r"architecture rwkv6 is not supported yet"):
        check_gguf(path)
