"""fptq's fused decode step (fptq.runtime.fused_step) behind the static decoder: logits against transformers' own
forward on the same static cache, with PyTorch's operations and with the Triton kernels under Triton's
interpreter; what it refuses, and why."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from fptq.errors import FptqError
from fptq.hf import set_backend
from fptq.kernels import decode_ops
from fptq.runtime.fused_step import FusedStep, cache_tensors, fused_step_problem
from fptq.runtime.graphs import StaticDecoder

from ..conftest import tiny_llama, tiny_w4a8, token_ids, with_cache

HAS_CUDA = torch.cuda.is_available()
INTERPRETED = importlib.util.find_spec("triton") is not None and os.environ.get("TRITON_INTERPRET") == "1"


def _tiny_qwen2(dtype=torch.float32):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
    return Qwen2ForCausalLM(cfg).eval().to(dtype)


def _steps(model, ids, n, follow=None, **kw):
    """The prompt's last logits and ``n`` steps' on a static decoder (clones: the decoder reuses buffers), each step
    fed the greedy token of ``follow``'s logits at that point (default: its own)."""
    dec = StaticDecoder(model, ids.shape[0], ids.shape[1] + n + 1, **kw)
    out = [dec.prefill(ids).clone()]
    for i in range(n):
        out.append(dec.step((out if follow is None else follow)[i].argmax(-1)).clone())
    return out, dec


def _agree(a_steps, b_steps, atol, rtol):
    for a, b in zip(a_steps, b_steps):
        torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("make", [tiny_llama, tiny_w4a8, _tiny_qwen2], ids=["llama", "w4a8", "qwen2-bias"])
def test_fused_steps_give_transformers_logits_on_the_static_cache(make):
    model = make()
    ids = token_ids(2, 7)
    ref, plain = _steps(model, ids, 6, fused=False)
    got, dec = _steps(model, ids, 6)  # its own greedy tokens: the same as transformers'
    assert [t.argmax(-1).tolist() for t in got] == [t.argmax(-1).tolist() for t in ref]
    assert dec.step_path.startswith("fptq fused decode step (PyTorch") and plain.step_path.startswith(
        "transformers forward (not asked for")
    _agree(got, ref, 2e-5, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_fused_steps_agree_with_transformers(dtype):
    """Half-precision models, batch 3: the PyTorch forms and (under the interpreter) the Triton kernels, within a
    few units of the last place of the logits (the attention sums in another order)."""
    model = _tiny_qwen2(dtype)
    ids = token_ids(3, 5)
    ref, _ = _steps(model, ids, 4, fused=False)
    got, _ = _steps(model, ids, 4, follow=ref)
    tol = 2e-2 if dtype == torch.float16 else 4e-2
    _agree(got, ref, tol, tol)
    if INTERPRETED and not HAS_CUDA:
        tri, _ = _steps(model, ids, 4, follow=ref, kernels="triton")
        _agree(tri, ref, tol, tol)


def test_each_layer_takes_five_operations_between_its_linears(monkeypatch):
    model = tiny_llama()
    calls = []
    for name in ("add_rmsnorm", "rope_write_kv", "decode_attention", "silu_mul"):
        fn = getattr(decode_ops, name)
        monkeypatch.setattr(decode_ops, name, lambda *a, _f=fn, _n=name, **k: calls.append(_n) or _f(*a, **k))
    dec = StaticDecoder(model, 1, 8)
    dec.step(dec.prefill(token_ids(1, 4)).argmax(-1))
    layers = model.config.num_hidden_layers
    assert len(calls) == 5 * layers + 1  # and the final norm
    assert calls.count("add_rmsnorm") == 2 * layers + 1 and calls.count("decode_attention") == layers


@pytest.mark.skipif(HAS_CUDA or not INTERPRETED, reason="runs the Triton kernels under Triton's CPU interpreter")
@pytest.mark.parametrize("dtype,batch", [(torch.float32, 2), (torch.float16, 2), (torch.float16, 3)])
def test_triton_fused_steps_with_the_triton_backend_match_transformers(dtype, batch):
    """The GPU configuration on the CPU: every Linear through the Triton backend (the dp4a GEMV at batch 2, the
    tensor-core kernel at 3; q/k/v and gate/up sharing launches), every operation between them through
    decode_ops' Triton kernels."""
    model = set_backend(tiny_w4a8().to(dtype), "triton")
    ids = token_ids(batch, 4)
    ref, _ = _steps(model, ids, 2, fused=False)
    got, dec = _steps(model, ids, 2, follow=ref, kernels="triton")
    assert dec.step_path.startswith("fptq fused decode step (Triton")
    shared = [spec for spec in dec._fused._specs.values() if spec is not None]
    assert shared  # some Linears took their codes from the launch that made their input
    tol = (2e-5, 1e-5) if dtype == torch.float32 else (2e-2, 1e-2)
    _agree(got, ref, *tol)


def _tiny_qwen3(dtype=torch.float32):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16)).eval()
    with torch.no_grad():
        for layer in model.model.layers:  # per-head norms that do something
            layer.self_attn.q_norm.weight.uniform_(0.5, 2.0)
            layer.self_attn.k_norm.weight.uniform_(0.5, 2.0)
    return model.to(dtype)


def test_qwen3s_per_head_query_and_key_norms_are_in_the_fused_step():
    model = _tiny_qwen3()
    assert fused_step_problem(model) is None
    ids = token_ids(2, 5)
    ref, _ = _steps(model, ids, 5, fused=False)
    got, dec = _steps(model, ids, 5, follow=ref)
    assert dec.step_path.startswith("fptq fused decode step")
    _agree(got, ref, 2e-5, 1e-5)
    if INTERPRETED and not HAS_CUDA:
        half = _tiny_qwen3(torch.float16)
        ref, _ = _steps(half, ids, 3, fused=False)
        got, _ = _steps(half, ids, 3, follow=ref, kernels="triton")
        _agree(got, ref, 2e-2, 1e-2)


def test_what_the_fused_step_refuses():
    assert fused_step_problem(tiny_llama()) is None
    dyn = tiny_llama(rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    assert "changes with the sequence length" in fused_step_problem(dyn)
    dec = StaticDecoder(dyn, 1, 8)  # falls back to transformers' forward, saying why
    dec.step(dec.prefill(token_ids(1, 3)).argmax(-1))
    assert "changes with the sequence length" in dec.step_path
    with pytest.raises(FptqError, match="fused decode step cannot run this model: its rotary embedding"):
        StaticDecoder(dyn, 1, 8, fused=True)
    hooked = tiny_llama()
    hooked.model.layers[1].mlp.register_forward_hook(lambda *a: None)
    assert fused_step_problem(hooked) == "a forward hook on LlamaMLP"
    model = tiny_llama()
    with pytest.raises(FptqError, match="kernels must be one of auto, triton, torch"):
        FusedStep(model, [], kernels="cuda")


def test_cache_tensors_of_a_static_cache_exist_after_its_prompt():
    import inspect

    from transformers import StaticCache

    model = tiny_llama()
    cache = StaticCache(config=model.config, max_cache_len=12)
    assert cache_tensors(cache) is None  # allocated by the first update
    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.inference_mode():
        model(token_ids(1, 3), use_cache=True, **{kw: cache})
    kv = cache_tensors(cache)
    assert len(kv) == 2 and kv[0][0].shape == (1, 2, 12, 16)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("batch", [2, 3])
def test_cuda_graph_of_the_fused_step_matches_transformers_eager_steps(batch):
    """On the GPU, replayed from a CUDA graph: the dp4a launches (batch 2) and the tensor-core ones (batch 3), q/k/v
    and gate/up sharing launches without any of them falling back."""
    from fptq.kernels import triton_w4a8 as tw

    model = set_backend(tiny_w4a8().half().cuda(), "triton")
    ids = token_ids(batch, 6).cuda()
    ref, _ = _steps(model, ids, 6, fused=False, graph=False)
    got, dec = _steps(model, ids, 6, follow=ref)
    assert dec.uses_graph, dec.graph_reason
    assert dec.step_path.startswith("fptq fused decode step (Triton")
    _agree(got, ref, 2e-2, 1e-2)
    assert not {"gemv_dp4a_layers", "gemv_dp4a_glu", "grouped_layers", "grouped_glu"} & tw._broken


@pytest.mark.parametrize("where", ["static", "transformers-api"])
def test_a_fused_step_that_fails_hands_over_to_transformers_mid_sequence(where, monkeypatch, caplog):
    """A kernel that raises (say, one the GPU's Triton cannot build): the decoder says why, once, and goes on with
    transformers' forward from that step; the logits stay transformers' because the fused steps before it moved the
    static cache's position counters as transformers' own steps do."""
    import copy
    import logging

    from transformers import DynamicCache

    from fptq.runtime.hf_graph import attach_graph_runtime

    model = tiny_llama()
    ids = token_ids(2, 5)
    real, calls = FusedStep.hidden, []

    def flaky(self, *a):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("no kernel image for this device")
        return real(self, *a)

    monkeypatch.setattr(FusedStep, "hidden", flaky)
    with caplog.at_level(logging.WARNING, logger="fptq.runtime.fused_step"):
        if where == "static":
            ref, _ = _steps(model, ids, 5, fused=False)
            got, dec = _steps(model, ids, 5, follow=ref)
            path = dec.step_path
            assert int(dec.cache.layers[0].cumulative_length) == ids.shape[1] + 5
        else:
            plain = copy.deepcopy(model)
            assert attach_graph_runtime(model) is None
            nxt = token_ids(2, 5, seed=4)
            with torch.no_grad():
                got, ref = [], []
                for m, out in ((model, got), (plain, ref)):
                    cache = DynamicCache(config=m.config)
                    out.append(m(ids, **with_cache(cache)).logits[:, -1])
                    for i in range(5):
                        out.append(m(nxt[:, i:i + 1], **with_cache(cache)).logits[:, -1])
            path = model.model.step_path
    _agree(got, ref, 2e-5, 1e-5)
    assert len(calls) == 3 and "the fused step failed (RuntimeError: no kernel image" in path
    assert sum("fused step failed" in r.message for r in caplog.records) == 1


@pytest.mark.skipif(not INTERPRETED and not HAS_CUDA, reason="the Triton backend runs on CUDA or the interpreter")
def test_linears_share_one_quantization_only_where_their_quantizers_agree():
    from fptq.nn import QuantLinear
    from fptq.runtime.fused_step import shared_quantizer

    def ql(mode="static_tensor", scale=0.05, backend="triton"):
        m = QuantLinear(64, 8, wbits=4, group_size=32, abits=8, act_mode=mode)
        m.act_scale = torch.tensor(scale)
        return m.set_backend(backend)

    cpu = torch.device("cpu")
    a, b = ql(), ql()
    spec = shared_quantizer((a, b), cpu)
    assert spec[0] is a.act_scale and spec[1] == 8
    assert shared_quantizer((ql("dynamic_token"), ql("dynamic_token")), cpu) == (None, 8)
    assert shared_quantizer((a, ql(scale=0.06)), cpu) is None  # two static scales
    assert shared_quantizer((a, ql("dynamic_token")), cpu) is None
    assert shared_quantizer((a, ql(backend="reference")), cpu) is None
    assert shared_quantizer((a, torch.nn.Linear(64, 8)), cpu) is None
    w8 = QuantLinear(64, 8, wbits=8, group_size=-1, abits=8, act_mode="static_tensor").set_backend("triton")
    w8.act_scale = torch.tensor(0.05)
    assert shared_quantizer((w8, a), cpu) is not None  # W8A8 per channel: the int8 GEMM takes codes too
    hooked = ql()
    hooked.register_forward_hook(lambda *x: None)  # the step would call its kernels, not the module
    assert shared_quantizer((a, hooked), cpu) is None


def test_a_fused_step_that_cannot_be_set_up_leaves_the_steps_to_transformers(monkeypatch, caplog):
    import logging

    model = tiny_llama()
    ids = token_ids(1, 4)
    ref, _ = _steps(model, ids, 3, fused=False)

    def broken(self, *a, **kw):
        raise TypeError("rotary_emb() got an unexpected keyword argument")

    monkeypatch.setattr(FusedStep, "__init__", broken)
    with caplog.at_level(logging.WARNING, logger="fptq.runtime.fused_step"):
        got, dec = _steps(model, ids, 3)
    _agree(got, ref, 0, 0)  # transformers' own steps, bit for bit
    assert "the fused step failed (TypeError: rotary_emb()" in dec.step_path


@pytest.mark.skipif(HAS_CUDA or not INTERPRETED, reason="counts the Triton launches under Triton's CPU interpreter")
@pytest.mark.parametrize("batch", [1, 3])
def test_a_w4a8_layers_decode_step_is_eight_or_nine_triton_launches(batch, monkeypatch):
    """The launch count the GPU run is planned around, counted: eight per layer (the norm, q/k/v in one launch,
    rotary, attention, o_proj, the norm, gate/up with SiLU x up in one launch, down_proj), nine at batch 3-16 where
    down_proj's input is quantized per token (gate/up in one launch, SiLU x up with the codes in another); the GEMVs
    (batch 1-2) reduce a split K themselves and quantize their input where no launch before gave codes; here where
    every Linear group shares its quantizer and o_proj's is static; then the final norm."""
    from triton.runtime.interpreter import InterpretedFunction

    model = set_backend(tiny_w4a8(), "triton")
    dec = StaticDecoder(model, batch, 8, kernels="triton")
    nxt = dec.prefill(token_ids(batch, 4)).argmax(-1)
    dec.step(nxt)  # sets up (device checks, shared quantizers)
    launched = []
    real = InterpretedFunction.run
    monkeypatch.setattr(InterpretedFunction, "run", lambda self, *a, **kw: launched.append(self.fn.__name__)
                        or real(self, *a, **kw))
    dec.step(nxt)
    layers = model.config.num_hidden_layers
    per_token = sum(l.mlp.down_proj.act_mode == "dynamic_token" for l in model.model.layers)
    assert all(s is not None for s in dec._fused._specs.values())  # (what this count assumes)
    assert len(launched) == 8 * layers + (per_token if batch > 2 else 0) + 1, sorted(set(launched))
    assert "_quant_act_kernel" not in launched and "_splitk_reduce_kernel" not in launched
    if batch <= 2:
        assert launched.count("_w4a8_gemv_dp4a_layers_kernel") == launched.count("_w4a8_gemv_dp4a_glu_kernel") == layers
    else:  # q/k/v (and gate/up before a per-token down_proj) side by side; gate/up with SiLU before a static one
        assert launched.count("_w4a8_gemm_layers_kernel") == layers + per_token
        assert launched.count("_w4a8_gemm_glu_kernel") == layers - per_token
