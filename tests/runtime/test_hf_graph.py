"""fptq's GPU runtime behind the transformers interface (fptq.runtime.hf_graph): a decoder stack that decodes on
a static KV cache (CUDA graphs on a GPU). On the CPU its steps run eagerly; logits and generations are checked
against the same model's transformers forward on a DynamicCache."""
import copy
import importlib.util
import logging
import os

import pytest
import torch
from transformers import DynamicCache, StaticCache

import fptq
from fptq.nn import QuantLinear
from fptq.runtime.hf_graph import GraphDecoder, attach_graph_runtime, detach_graph_runtime, uses_graph_runtime

from ..conftest import hf_greedy, make_tokenizer, tiny_llama, tiny_w4a8, token_ids, with_cache

HAS_CUDA = torch.cuda.is_available()


_ids = token_ids
_quantized = tiny_w4a8


def _pair(make, **kw):
    """The model with the static-cache runtime attached, and an untouched copy (the reference)."""
    model = make()
    ref = copy.deepcopy(model)
    assert attach_graph_runtime(model, **kw) is None
    return model, ref


def close(a, b):
    # the static cache's masked attention over its whole length: another float32 summation order
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


def _steps(model, ids, cache, tokens):
    """Logits of the prompt's last position, then of each one-token call for ``tokens`` ``[B, n]``."""
    out = [model(ids, **with_cache(cache)).logits[:, -1]]
    for i in range(tokens.shape[1]):
        out.append(model(tokens[:, i:i + 1], **with_cache(cache)).logits[:, -1])
    return out


@pytest.mark.parametrize("make", [tiny_llama, _quantized], ids=["float", "w4a8"])
def test_calls_and_generate_match_transformers(make):
    model, ref = _pair(make)
    assert uses_graph_runtime(model) and isinstance(model.model, GraphDecoder)
    sd, sd_ref = model.state_dict(), ref.state_dict()
    assert sd.keys() == sd_ref.keys() and all(torch.equal(sd[k], sd_ref[k]) for k in sd)  # same modules
    ids, nxt = _ids(), _ids(2, 5, seed=2)
    with torch.no_grad():
        close(model(ids).logits, ref(ids).logits)
        cache, cache_ref = DynamicCache(config=model.config), DynamicCache(config=ref.config)
        for a, b in zip(_steps(model, ids, cache, nxt), _steps(ref, ids, cache_ref, nxt)):
            close(a, b)
    assert cache.get_seq_length() == 14 and cache.layers[0].keys.shape == cache_ref.layers[0].keys.shape
    assert model.model.step_path.startswith("fptq fused decode step (PyTorch")  # the steps were fptq's fused ones
    assert torch.equal(hf_greedy(model, ids, 12), hf_greedy(ref, ids, 12))
    beams = dict(max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0)  # reorders the cache every step
    with torch.no_grad():
        assert torch.equal(model.generate(ids, attention_mask=torch.ones_like(ids), **beams),
                           ref.generate(ids, attention_mask=torch.ones_like(ids), **beams))
    assert not model.model.uses_graph and model.model.graph_reason.startswith("not asked for")
    assert detach_graph_runtime(model) is model and not uses_graph_runtime(model)


def test_a_cropped_cache_continues_in_place_and_a_longer_sequence_grows_the_static_cache():
    model, ref = _pair(tiny_llama, slack=3)
    ids, nxt = _ids(1, 6), _ids(1, 12, seed=3)
    with torch.no_grad():
        cache, cache_ref = DynamicCache(config=model.config), DynamicCache(config=ref.config)
        _steps(model, ids, cache, nxt[:, :2])  # the prompt on the DynamicCache, the steps on a static one
        _steps(ref, ids, cache_ref, nxt[:, :2])
        [slot] = model.model._slots
        assert slot.capacity == 10 and cache.layers[0].keys.data_ptr() == slot.keys[0].data_ptr()
        cache.crop(-3)  # transformers 5: the number of positions to drop
        cache_ref.crop(-3)
        assert cache.get_seq_length() == 5
        got = [model(nxt[:, i:i + 1], **with_cache(cache)).logits[:, -1] for i in range(2, 12)]  # past the capacity 10
        want = [ref(nxt[:, i:i + 1], **with_cache(cache_ref)).logits[:, -1] for i in range(2, 12)]
        more = _ids(1, 4, seed=10)  # a next turn: several tokens appended where the sequence is
        close(model(more, **with_cache(cache)).logits, ref(more, **with_cache(cache_ref)).logits)
    for a, b in zip(got, want):
        close(a, b)
    [grown] = model.model._slots
    assert grown is not slot and grown.capacity == 20 and cache.get_seq_length() == 19


def test_the_next_sequence_reuses_the_static_cache_and_the_earlier_cache_keeps_what_it_holds():
    model, ref = _pair(tiny_llama)
    a_ids, b_ids, tok = _ids(2, 7, seed=4), _ids(2, 5, seed=5), _ids(2, 1, seed=6)
    with torch.no_grad():
        first, second = DynamicCache(config=model.config), DynamicCache(config=model.config)
        model(a_ids, **with_cache(first))
        model(tok, **with_cache(first))
        [slot] = model.model._slots
        held = first.layers[1].keys.clone()
        model(b_ids, **with_cache(second))
        model(tok, **with_cache(second))
        assert model.model._slots == [slot]  # same batch, fits: the static cache (and a GPU's graph) is reused
        assert torch.equal(first.layers[1].keys, held)  # the earlier cache got copies before the reuse
        later = model(tok, **with_cache(first)).logits  # and continues (copied back in)
        want_cache = DynamicCache(config=ref.config)
        ref(a_ids, **with_cache(want_cache))
        ref(tok, **with_cache(want_cache))
        close(later, ref(tok, **with_cache(want_cache)).logits)
        assert model.model._slots == [slot] and first.get_seq_length() == 9


def test_what_the_static_cache_cannot_do_runs_on_transformers_logged_once(caplog):
    model, ref = _pair(tiny_llama)
    ids = _ids(2, 8)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    with caplog.at_level(logging.WARNING, logger="fptq.runtime.hf_graph"), torch.no_grad():
        a = model(ids, attention_mask=mask).logits
        model(ids, attention_mask=mask)
        assert torch.equal(a, ref(ids, attention_mask=mask).logits)  # transformers' own forward, same modules
        static = StaticCache(config=model.config, max_cache_len=16)
        assert torch.equal(model(ids, **with_cache(static)).logits,
                           ref(ids, **with_cache(StaticCache(config=ref.config, max_cache_len=16))).logits)
        assert len(model(ids, output_hidden_states=True).hidden_states) == 3
    messages = [r.message for r in caplog.records]
    assert sum("attention mask has padding" in m for m in messages) == 1
    assert sum("StaticCache, not a DynamicCache" in m for m in messages) == 1
    assert model.model._slots == []  # nothing ran on a static cache
    got = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(got, ref.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0))


def test_activation_modes_set_after_attaching_are_what_it_computes():
    model, ref = _pair(_quantized)
    ids = _ids(1, 6)
    for m in (model, ref):
        fptq.nn.set_act_mode(m, "dynamic_token")
    with torch.no_grad():
        close(model(ids).logits, ref(ids).logits)
    modes = {m.act_mode for m in model.modules() if isinstance(m, QuantLinear)}
    assert modes == {"dynamic_token"} and model.model._graph_modes == model.model._modes()


def test_attach_refuses_what_it_cannot_run_and_graphs_need_cuda():
    model = tiny_llama(sliding_window=4, use_sliding_window=True)
    assert "sliding-window" in attach_graph_runtime(model)
    assert not uses_graph_runtime(model)
    if not HAS_CUDA:
        with pytest.raises(ValueError, match="CUDA graphs need the model on a CUDA device"):
            attach_graph_runtime(tiny_llama(), graph=True)


def test_compiled_decode_steps_match_the_uncompiled_ones_and_a_failing_compile_falls_back(caplog):
    """torch.compile of the decode step (Inductor on the CPU here; the QuantLinears are graph breaks): the same
    logits as the eager steps, prompts stay uncompiled; a compile that fails leaves the step where it was."""
    model, ref = _pair(tiny_w4a8, compile=True)
    ids, nxt = _ids(1, 6), _ids(1, 3, seed=9)
    with torch.no_grad():
        got = _steps(model, ids, DynamicCache(config=model.config), nxt)
        want = _steps(ref, ids, DynamicCache(config=ref.config), nxt)
    for a, b in zip(got, want):
        close(a, b)
    dec = model.model
    assert dec._compiled is not None and dec.compile_reason is None
    assert model.state_dict().keys() == ref.state_dict().keys()

    def broken(**kw):
        dec.transformers_module(**kw)  # runs (advancing the static cache's counters), then fails
        raise RuntimeError("inductor says no")

    dec._compiled = broken
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="fptq.runtime.hf_graph"):
        cache, cache_ref = DynamicCache(config=model.config), DynamicCache(config=ref.config)
        for a, b in zip(_steps(model, ids, cache, nxt), _steps(ref, ids, cache_ref, nxt)):
            close(a, b)
    assert dec._compiled is None and "inductor says no" in dec.compile_reason
    assert sum("decoding uncompiled" in r.message for r in caplog.records) == 1 and cache.get_seq_length() == 9


@pytest.mark.skipif(HAS_CUDA or os.environ.get("TRITON_INTERPRET") != "1" or importlib.util.find_spec("triton") is None,
                    reason="runs the Triton backend under Triton's CPU interpreter (a GPU runs the gpu-marked tests)")
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_triton_backend_through_the_transformers_interface_matches_the_reference_backend(compile):
    """The calls a GPU makes (a prompt through the grouped kernel, steps through the GEMV that quantizes its own
    input), run on the CPU under Triton's interpreter, behind model(...). Compiled, the kernels are graph breaks
    (traced by Dynamo, their launch code failed and the backend fell back to two launches for good)."""
    import warnings

    model, ref = _pair(_quantized, compile=compile)
    fptq.hf.set_backend(model, "triton")
    fptq.hf.set_backend(ref, "reference")
    ids, nxt = _ids(1, 6), _ids(1, 3, seed=7)
    with torch.no_grad(), warnings.catch_warnings():
        # a kernel that falls back warns ("fptq triton ..."); warnings of others (Dynamo's on Python 3.13.0,
        # "Guards may run slower") stay warnings
        warnings.filterwarnings("error", message="fptq triton")
        got = _steps(model, ids, DynamicCache(config=model.config), nxt)
    want = _steps(ref, ids, DynamicCache(config=ref.config), nxt)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert model.model.compile_reason == (None if compile else "not asked for")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_fptq_load_on_cuda_decodes_with_cuda_graphs(tmp_path):
    model = tiny_llama()
    plan = fptq.quantize(model, fptq.method_config("fptq", group_size=32, thresholds=(2.0, 20.0)),
                         _ids(8, 32, seed=0), device="cpu", progress=False)
    out = fptq.save(model, plan, tmp_path / "out", tokenizer=make_tokenizer())
    assert not uses_graph_runtime(fptq.load(out))  # on the CPU: fptq's CPU runtime (fptq.runtime.hf_fast)
    fast, slow = fptq.load(out, device="cuda"), fptq.load(out, device="cuda", runtime="off")
    assert uses_graph_runtime(fast) and not uses_graph_runtime(slow)
    ids = _ids().cuda()
    with torch.no_grad():
        cache, cache_ref = DynamicCache(config=fast.config), DynamicCache(config=slow.config)
        nxt = _ids(2, 6, seed=2).cuda()
        got, want = _steps(fast, ids, cache, nxt), _steps(slow, ids, cache_ref, nxt)
    assert fast.model.uses_graph, fast.model.graph_reason
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)
    g = fast.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False, pad_token_id=0)
    assert g.shape[0] == 2 and 9 < g.shape[1] <= 25 and fast.model.uses_graph  # (an end-of-sequence token may stop it)


def test_warm_up_runs_before_a_capture_leave_the_static_cache_as_one_step_would():
    from fptq.runtime.graphs import warm_up

    model, ref = _pair(tiny_llama)
    ids, nxt = _ids(), _ids(2, 4, seed=8)
    with torch.no_grad():
        cache, cache_ref = DynamicCache(config=model.config), DynamicCache(config=ref.config)
        for m, c in ((model, cache), (ref, cache_ref)):
            m(ids, **with_cache(c))
            m(nxt[:, :1], **with_cache(c))
        dec = model.model
        [slot] = dec._slots
        slot.ids.copy_(nxt[:, 1:2])
        slot.pos.fill_(slot.length)
        warm_up(*dec._step_fns(slot), 3)  # what precedes a capture: three runs of the step at position 10
        assert slot.length == 10 and all(int(la.cumulative_length) == 10 for la in slot.cache.layers)
        for i in range(1, 4):
            close(model(nxt[:, i:i + 1], **with_cache(cache)).logits, ref(nxt[:, i:i + 1], **with_cache(cache_ref)).logits)


def test_a_static_cache_far_longer_than_a_new_sequence_needs_is_not_reused():
    """A step reads the whole static cache, so a short sequence after a long prompt gets one of its size."""
    model, _ = _pair(tiny_llama, slack=3)
    tok = _ids(1, 1, seed=4)

    def sequence(prompt_len, seed):
        cache = DynamicCache(config=model.config)
        model(_ids(1, prompt_len, seed=seed), **with_cache(cache))
        model(tok, **with_cache(cache))
        return model.model._slots[-1]

    with torch.no_grad():
        long_slot = sequence(40, 1)
        assert long_slot.capacity == 44
        assert sequence(30, 2) is long_slot  # needs 31 (+3): 44 is at most twice that
        short = sequence(5, 3)
        assert short is not long_slot and short.capacity == 9 and model.model._slots == [long_slot, short]
        for seed in range(4, 8):  # more static caches than are kept: the least recently used go
            sequence(5 + 20 * seed, seed)
    assert len(model.model._slots) == 4 and long_slot not in model.model._slots
