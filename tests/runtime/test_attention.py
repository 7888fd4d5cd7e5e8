"""The prompt attention of fptq's runtime: which path runs where, and every path against transformers."""
import pytest
import torch

from fptq.errors import FptqError
from fptq.kernels import native
from fptq.runtime import Engine
from fptq.runtime.attention import prefill_attention_path
from fptq.runtime.hf_fast import attach_runtime

from ..conftest import sqnr_db, tiny_llama, token_ids


@pytest.mark.parametrize("choice,native_bf16,head_dim,amx,want", [
    ("auto", True, 64, True, "sdpa_bf16"),     # AMX: oneDNN's bf16 tiles
    ("auto", False, 16, True, "sdpa_bf16"),
    ("auto", True, 64, False, "native"),       # AVX512-BF16 without AMX: fptq's flash kernel
    ("auto", True, 96, False, "sdpa"),         # a head size the flash kernel lacks
    ("auto", False, 64, False, "sdpa"),        # no AVX512-BF16
    ("native", False, 64, True, "sdpa"),       # asked for, cannot run: float32 SDPA
    ("native", True, 128, True, "native"),
    ("sdpa_bf16", False, 64, False, "sdpa_bf16"),
    ("sdpa", True, 64, True, "sdpa"),
])
def test_prefill_attention_path(choice, native_bf16, head_dim, amx, want):
    assert prefill_attention_path(choice, native_bf16, head_dim, amx) == want


@pytest.mark.parametrize("choice,head_dim,want", [
    ("auto", 64, "native"),        # fptq's kernel on AMX-BF16 tiles (bf16 cache, avx512_amx build)
    ("auto", 96, "native"),        # any multiple of 32 there
    ("auto", 80, "sdpa_bf16"),     # not a multiple of 32: oneDNN's tiles
    ("native", 160, "native"),
    ("native", 48, "sdpa"),        # asked for, cannot run
    ("sdpa_bf16", 64, "sdpa_bf16"),
])
def test_prefill_attention_path_with_the_amx_kernel(choice, head_dim, want):
    assert prefill_attention_path(choice, True, head_dim, True, native_amx=True) == want


def test_the_engine_takes_the_amx_kernel_only_for_a_bfloat16_cache():
    if not (native.available() and native.has_amx_attention()):
        pytest.skip("needs the avx512_amx build on a CPU with AMX-BF16")
    model = tiny_llama(hidden_size=256, num_attention_heads=4, num_key_value_heads=2)
    assert Engine(model).prefill_path == "native"
    assert Engine(model, kv_dtype=torch.int8).prefill_path == "sdpa_bf16"  # the AMX kernel reads bf16 caches only
    assert Engine(model, kv_dtype=torch.float32).prefill_path == "native"  # float32 asked for: the flash kernel


def test_a_float32_cache_keeps_float32_attention_by_default():
    assert prefill_attention_path("auto", True, 64, True, float32_cache=True) == "native"
    assert prefill_attention_path("auto", False, 64, True, float32_cache=True) == "sdpa"
    assert prefill_attention_path("sdpa_bf16", False, 64, True, float32_cache=True) == "sdpa_bf16"  # asked for


def test_an_unknown_prefill_attention_is_refused_with_the_choices():
    with pytest.raises(FptqError, match="flash.*not a choice: auto, native, sdpa_bf16, sdpa"):
        prefill_attention_path("flash", True, 64, True)
    with pytest.raises(FptqError, match="not a choice"):
        Engine(tiny_llama(), prefill_attention="flash")
    with pytest.raises(FptqError, match="not a choice"):  # at attach time, not at the model's first call
        attach_runtime(tiny_llama(), prefill_attention="flash")


@pytest.mark.parametrize("choice", ["sdpa_bf16", "native", "sdpa"])
def test_every_prompt_attention_tracks_transformers(choice):
    """A model with 64-wide heads (the flash kernel's size) on a bfloat16 cache: the prompt's logits against the
    float32 transformers forward, in one call and in two chunks (the second attends to the cached first)."""
    model = tiny_llama(hidden_size=256, num_attention_heads=4, num_key_value_heads=2)
    ids = token_ids(2, 40, seed=3)
    with torch.inference_mode():
        ref = model(ids).logits
    eng = Engine(model, prefill_attention=choice)
    if choice == "native" and not native.has_bf16():
        assert eng.prefill_path == "sdpa"
    else:
        assert eng.prefill_path == choice
    full = eng.forward(ids, eng.new_cache(2, 40), logits="all")
    assert sqnr_db(ref, full) > 45  # bf16 keys and values (and bf16 dot products): ~51-56 dB here
    cache = eng.new_cache(2, 40)
    chunks = torch.cat([eng.forward(ids[:, :25], cache, logits="all"), eng.forward(ids[:, 25:], cache, logits="all")], 1)
    assert sqnr_db(ref, chunks) > 45
    assert sqnr_db(full, chunks) > 60
