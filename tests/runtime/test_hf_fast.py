"""fptq's runtime behind the transformers interface (fptq.runtime.hf_fast): ``fptq.load(OUT)`` and
``from_pretrained(OUT)`` models whose forward and generate run on the Engine."""
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

import fptq
from fptq.hf import set_backend
from fptq.kernels import native
from fptq.runtime import Engine
from fptq.runtime.hf_fast import RuntimeDecoder, attach_runtime, detach_runtime, uses_runtime

from ..conftest import make_tokenizer, returned_cache, sqnr_db, tiny_llama, token_ids, with_cache

pytestmark = pytest.mark.skipif(not native.available(), reason="fptq's runtime runs the native kernels")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    model = tiny_llama()
    ids = torch.randint(0, 300, (8, 32), generator=torch.Generator().manual_seed(0))
    plan = fptq.quantize(model, fptq.method_config("fptq", group_size=32, thresholds=(2.0, 20.0)), ids,
                         device="cpu", progress=False)
    return fptq.save(model, plan, tmp_path_factory.mktemp("hf_fast") / "out", tokenizer=make_tokenizer())


def _ids(b=2, t=20, seed=1):
    return token_ids(b, t, seed)


def logits_close(a, b):
    """The same 16-bit logits up to the head's float32 summation order (its blocked path, see
    fptq.runtime.head): at most one bfloat16 step apart."""
    assert a.dtype == b.dtype and a.shape == b.shape
    assert ((a.float() - b.float()).abs() <= 2 ** -7 * b.float().abs() + 1e-6).all()


def _modules_path(ckpt):
    """The same model on transformers' modules, with the unquantized tensors as the runtime holds them."""
    return fptq.load(ckpt, runtime="off", dtype=torch.bfloat16)


def test_load_runs_on_the_runtime_with_the_stored_16_bit_tensors(ckpt):
    fast = fptq.load(ckpt)
    assert uses_runtime(fast) and isinstance(fast.model, RuntimeDecoder)
    assert not uses_runtime(fptq.load(ckpt, runtime="off"))
    slow = fptq.load(ckpt, runtime="off")
    assert slow.dtype == torch.float32  # the source model's dtype, as before
    assert fast.model.embed_tokens.weight.dtype == torch.bfloat16  # stored bf16: kept so, exactly
    assert torch.equal(fast.model.embed_tokens.weight.float(), slow.model.embed_tokens.weight)
    sd_fast, sd_mod = fast.state_dict(), _modules_path(ckpt).state_dict()
    assert sd_fast.keys() == sd_mod.keys()
    for k in sd_fast:  # the same tensors under the same names: nothing is copied or renamed
        assert sd_fast[k].dtype == sd_mod[k].dtype and torch.equal(sd_fast[k], sd_mod[k]), k
    assert not any(p.requires_grad for p in fast.parameters())
    with pytest.raises(fptq.FptqError, match="runtime must be"):
        fptq.load(ckpt, runtime="fast")


def test_forward_matches_the_integer_kernels_module_by_module(ckpt):
    ids = _ids()
    fast, ref = fptq.load(ckpt), fptq.load(ckpt, runtime="off")  # float32 modules, float32 KV cache
    with torch.no_grad():
        a, b = fast(ids).logits.float(), ref(ids).logits.float()
    assert a.shape == b.shape == (2, 20, 300)
    # the floor of tests/runtime/test_engine.py: the bf16 KV cache and float summation order flip a few int8
    # roundings of this tiny model's outlier channels
    assert sqnr_db(b, a) > 25
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9
    out = fast(ids)  # outside no_grad too: the model is inference-only, so the runtime still runs it
    assert torch.equal(out.logits, fast(ids).logits)


def test_cache_continues_across_calls_as_one_forward(ckpt):
    fast, ids = fptq.load(ckpt), _ids(1, 12)
    with torch.no_grad():
        full = fast(ids).logits
        cache = DynamicCache(config=fast.config)  # the user's cache object, passed again and again
        first = fast(ids[:, :8], **with_cache(cache), logits_to_keep=1).logits
        assert cache.get_seq_length() == 8
        steps = [fast(ids[:, i:i + 1], **with_cache(cache)).logits[:, -1] for i in range(8, 12)]
        assert cache.get_seq_length() == 12
        assert cache.layers[0].keys.shape[-2] == 12  # transformers sees the runtime's keys as a normal cache
        returned = returned_cache(fast(ids[:, :8]))  # no cache given: a new one is returned, and continues
        step = fast(ids[:, 8:9], **with_cache(returned)).logits[:, -1]
    assert torch.equal(first[:, -1], full[:, 7])
    # the prompt's attention runs in bfloat16 on CPUs with AMX (fptq.runtime.attention), the steps' in float32;
    # on this tiny W4A8 model that flips a few activation codes: ~26 dB there, > 40 dB with float32 on both sides
    assert sqnr_db(full[:, 8:].float(), torch.stack(steps, 1).float()) > 20
    assert torch.equal(full[:, 8:].argmax(-1), torch.stack(steps, 1).argmax(-1))
    assert torch.equal(step, steps[0])


def test_greedy_generate_equals_the_engine(ckpt):
    fast, ids = fptq.load(ckpt), _ids(2, 6)
    got = fast.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False, pad_token_id=0)
    engine = Engine(fptq.runtime.load_for_runtime(ckpt))
    assert torch.equal(got, engine.generate(ids, max_new_tokens=10))


def test_what_the_runtime_cannot_do_falls_back_to_transformers_once_logged(ckpt, caplog):
    fast, ref, ids = fptq.load(ckpt, head="stored"), _modules_path(ckpt), _ids(2, 8)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    with caplog.at_level(logging.WARNING, logger="fptq.runtime.hf_fast"), torch.no_grad():
        a = fast(ids, attention_mask=mask).logits
        fast(ids, attention_mask=mask)
        b = ref(ids, attention_mask=mask).logits
    logits_close(a, b)  # transformers' own forward, on the same modules (the runtime's head: its summation order)
    assert sum("attention mask has padding" in r.message for r in caplog.records) == 1
    with torch.no_grad():  # hidden states asked for: also transformers'
        assert len(fast(ids, output_hidden_states=True).hidden_states) == 3
    got = fast.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    want = ref.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)


def test_a_cache_continued_by_the_other_path_stays_consistent(ckpt):
    """Prefill on the runtime, one step on transformers' forward (a fallback), the next on the runtime again:
    each side reads what the other wrote."""
    fast, ids = fptq.load(ckpt), _ids(1, 10)
    with torch.no_grad():
        full = fast(ids).logits
        cache = DynamicCache(config=fast.config)
        fast(ids[:, :8], **with_cache(cache))
        mid = fast(ids[:, 8:9], **with_cache(cache), output_hidden_states=True).logits  # transformers' forward
        last = fast(ids[:, 9:10], **with_cache(cache)).logits  # the runtime again, on the cache it copies back in
    assert cache.get_seq_length() == 10
    # the runtime and transformers' forward differ by themselves (17-50 dB per position on this tiny model, in
    # every configuration of the default: 17.6 dB with the rotated default on an AVX-512 BF16 CPU, whose prompt
    # attention rounds to bfloat16); a step on a cache that holds other tokens gave 0.6 dB
    assert sqnr_db(full[:, 8].float(), mid[:, -1].float()) > 12
    assert sqnr_db(full[:, 9].float(), last[:, -1].float()) > 12


def test_activation_modes_set_after_loading_are_what_the_runtime_computes(ckpt):
    """``fptq.nn.set_act_mode`` on a loaded model (every layer dynamic, or the weights alone, as runtimes without
    static scales run a checkpoint) changes what ``model(...)`` computes on the runtime as on the modules."""
    from fptq.nn import set_act_mode

    fast, ref, ids = fptq.load(ckpt), fptq.load(ckpt, runtime="off"), _ids()
    with torch.no_grad():
        plan = fast(ids).logits.float()
        for mode in ("none", "dynamic_token"):
            set_act_mode(fast, mode)
            set_act_mode(ref, mode)
            a, b = fast(ids).logits.float(), ref(ids).logits.float()
            assert uses_runtime(fast) and not torch.equal(a, plan), mode
            assert sqnr_db(b, a) > 25 and sqnr_db(b, a) > sqnr_db(b, plan) + 3, mode


def test_forward_hooks_on_the_decoder_run_on_transformers(ckpt, caplog):
    """A hook on a module of the decoder (a user capturing activations) is called: that forward runs on
    transformers' modules, with the reason logged once; without hooks the runtime takes over again."""
    fast, ref, ids = fptq.load(ckpt, head="stored"), _modules_path(ckpt), _ids()
    seen = []
    handle = fast.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape))
    with caplog.at_level(logging.WARNING, logger="fptq.runtime.hf_fast"), torch.no_grad():
        a, b = fast.model(ids).last_hidden_state, ref.model(ids).last_hidden_state
        logits_close(fast(ids).logits, ref(ids).logits)
    k = fast.model.layers[1].mlp.down_proj.in_features
    assert seen == [(2, 20, k)] * 2 and torch.equal(a, b)
    assert sum("forward hooks" in r.message for r in caplog.records) == 1
    handle.remove()
    with torch.no_grad():
        fast(ids)
    assert len(seen) == 2


def test_beam_search_runs_on_the_runtime(ckpt):
    fast, ref, ids = fptq.load(ckpt), _modules_path(ckpt), _ids(1, 6)
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=5, num_beams=3, do_sample=False, pad_token_id=0)
    got, want = fast.generate(ids, **kw), ref.generate(ids, **kw)
    assert got.shape == want.shape == (1, 11)
    assert torch.equal(got[:, :6], ids)


def test_reference_backend_and_detach_use_transformers(ckpt):
    assert not uses_runtime(fptq.load(ckpt, backend="reference"))
    fast, ids = fptq.load(ckpt, head="stored"), _ids()
    ref = _modules_path(ckpt)
    set_backend(fast, "reference")
    set_backend(ref, "reference")
    with torch.no_grad():
        assert torch.equal(fast.model(ids).last_hidden_state, ref.model(ids).last_hidden_state)
        logits_close(fast(ids).logits, ref(ids).logits)
    detach_runtime(fast)
    assert not uses_runtime(fast) and type(fast.model).__name__ == "LlamaModel" and type(fast.lm_head) is torch.nn.Linear
    assert attach_runtime(fast) is None and uses_runtime(fast)


def test_from_pretrained_runs_on_the_runtime_too(ckpt):
    hf = AutoModelForCausalLM.from_pretrained(ckpt)
    assert uses_runtime(hf)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, fptq.load(ckpt)(ids).logits)


def test_unsupported_architecture_keeps_transformers(tmp_path):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(vocab_size=300, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=64)).eval()
    assert "supports" in attach_runtime(model)
    assert not uses_runtime(model)


def test_grow_cache_keeps_what_it_holds(ckpt):
    engine = Engine(fptq.runtime.load_for_runtime(ckpt))
    cache = engine.new_cache(1, 8)
    ids = _ids(1, 6)
    engine.forward(ids, cache)
    keys = cache.keys[0][:, :, :6].clone()
    engine.grow_cache(cache, 9)
    assert cache.max_len == 16 and cache.length == 6 and torch.equal(cache.keys[0][:, :, :6], keys)


def test_the_head_takes_strided_rows_as_one_matrix(ckpt):
    """The runtime's lm_head gives nn.Linear's values on the strided slice transformers hands it (it avoids a
    slow path of PyTorch's CPU bfloat16 linear), keeps the Parameters (and a tie) and the state dict key."""
    from fptq.runtime.hf_fast import RuntimeHead

    fast = fptq.load(ckpt, head="stored")
    assert isinstance(fast.lm_head, RuntimeHead) and list(fast.lm_head.state_dict()) == ["weight"]
    ref = torch.nn.Linear(64, 300, bias=False, dtype=torch.bfloat16)
    ref.weight = fast.lm_head.weight
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)[:, -1:, :]
    with torch.no_grad():
        assert torch.equal(fast.lm_head(x), ref(x))
    int8 = fptq.load(ckpt).lm_head  # the default head: the same product on the strided rows as on a copy
    assert list(int8.state_dict()) == ["weight"] and int8.product.kind == "int8"
    assert torch.equal(int8(x), int8(x.contiguous()))


def test_the_default_head_is_int8_within_the_stored_heads_logits(ckpt):
    """``fptq.load``'s default head multiplies with the head requantized to int8: its logits are the stored
    head's up to that rounding (SQNR bound), the state dict and tie are unchanged, and a fall-back call (padding)
    uses the same head; ``head="stored"`` keeps the checkpoint's own, a bad choice is refused."""
    fast, stored, ids = fptq.load(ckpt), fptq.load(ckpt, head="stored"), _ids()
    with torch.no_grad():
        a, b = fast(ids).logits, stored(ids).logits
        assert torch.equal(fast.model(ids).last_hidden_state, stored.model(ids).last_hidden_state)
    assert fast.lm_head.product.kind == "int8" and stored.lm_head.product.kind == "stored"
    assert a.dtype == torch.float32 and not torch.equal(a, b.float())
    assert sqnr_db(b.float(), a) > 35 and (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.97
    assert fast.state_dict().keys() == stored.state_dict().keys()
    with pytest.raises(fptq.FptqError, match="head must be one of"):
        fptq.load(ckpt, head="int4")


def test_a_long_prompts_logits_keep_the_stored_heads_dtype(ckpt):
    """Beyond INT8_MAX_ROWS rows the default head hands the rows to the stored head: the model returns its
    bfloat16 logits as they are (as transformers' bfloat16 model does), equal to head="stored"'s; a few rows
    (decoding) keep the int8 product's float32."""
    from fptq.runtime.head import INT8_MAX_ROWS

    if not native.available():
        pytest.skip("the int8 head runs the native kernels")
    fast, stored = fptq.load(ckpt), fptq.load(ckpt, head="stored")
    ids = token_ids(1, INT8_MAX_ROWS + 6, 3)
    with torch.no_grad():
        a, b = fast(ids).logits, stored(ids).logits
        assert a.dtype == b.dtype == torch.bfloat16 and torch.equal(a, b)
        assert fast(ids, logits_to_keep=1).logits.dtype == torch.float32


def test_the_runtime_head_off_the_cpu_is_a_plain_linear():
    """A model moved off the CPU after loading: its head multiplies as nn.Linear does, the int8 head (a CPU
    kernel) is never built."""
    from fptq.runtime.hf_fast import RuntimeHead

    head = RuntimeHead.of(torch.nn.Linear(64, 300, device="meta"), "int8", True)
    y = head(torch.empty(2, 5, 64, device="meta"))
    assert y.shape == (2, 5, 300) and y.device.type == "meta" and head._product is None


def test_a_long_prompt_runs_in_chunks_with_the_whole_prompts_logits(ckpt):
    """4 prompts of 300 tokens are 1200 rows: fptq.load's runtime runs them in two chunks of 150 tokens
    (fptq.runtime.prefill); every position's logits and greedy generate() equal a runtime that runs them whole."""
    from fptq.runtime.prefill import prefill_spans

    chunked, whole = fptq.load(ckpt), fptq.load(ckpt)
    ids = token_ids(4, 300, 5)
    with torch.no_grad():
        whole(ids[:1, :4])  # the first call builds the runtime's Engine
    whole.model.engine.prefill_chunk = 0
    assert len(prefill_spans(4, 300, chunked.model.engine.prefill_chunk)) == 2
    with torch.no_grad():
        a, b = chunked(ids).logits, whole(ids).logits
    assert torch.isfinite(a.float()).all() and torch.equal(a, b)
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(chunked.generate(ids, **kw), whole.generate(ids, **kw))
