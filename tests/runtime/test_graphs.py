"""The GPU decode path (fptq.runtime.graphs): a static KV cache whose steps replay as CUDA graphs. On the CPU
the same calls run eagerly; their logits are checked against transformers' own DynamicCache path."""
import importlib.util
import os

import pytest
import torch

from fptq.runtime.graphs import StaticDecoder, static_generate
from fptq.runtime.timing import StaticRunner

from ..conftest import hf_greedy, tiny_llama, tiny_w4a8, token_ids

HAS_CUDA = torch.cuda.is_available()


_ids = token_ids
_quantized = tiny_w4a8


def _dynamic_reference(model, ids, steps):
    """Logits of the prompt's last position and of ``steps`` greedy steps, through transformers' DynamicCache."""
    from transformers import DynamicCache

    from fptq.runtime.timing import HFRunner

    kw = HFRunner(model)._cache_kw
    cache = DynamicCache(config=model.config)
    out = []
    with torch.inference_mode():
        logits = model(ids, use_cache=True, **{kw: cache}).logits[:, -1]
        for _ in range(steps + 1):
            out.append(logits)
            logits = model(logits.argmax(-1)[:, None], use_cache=True, **{kw: cache}).logits[:, -1]
    return out


@pytest.mark.parametrize("make", [tiny_llama, _quantized], ids=["float", "w4a8"])
def test_static_steps_match_transformers_dynamic_cache(make):
    model = make()
    ids = _ids()
    ref = _dynamic_reference(model, ids, 5)
    dec = StaticDecoder(model, batch=2, max_len=20)
    for _ in range(2):  # a second prompt on the same decoder starts from a cleared cache
        got = [dec.prefill(ids).clone()]
        for i in range(5):
            got.append(dec.step(ref[i].argmax(-1)).clone())
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)  # masked static keys: another summation order
    assert dec.length == ids.shape[1] + 5 and not dec.uses_graph


def test_warm_up_runs_leave_the_cache_as_one_step_would():
    """What precedes a capture: the step run several times at the same position changes nothing."""
    model = tiny_llama()
    ids = _ids()
    plain, warmed = StaticDecoder(model, 2, 16), StaticDecoder(model, 2, 16, warmup=3)
    nxt = plain.prefill(ids).argmax(-1)
    warmed.prefill(ids)
    a = [plain.step(nxt).clone()]
    warmed._ids.copy_(nxt[:, None])
    warmed._pos.fill_(warmed.length)
    with torch.inference_mode():
        warmed._warm()
    b = [warmed.step(nxt).clone()]
    for _ in range(3):
        a.append(plain.step(a[-1].argmax(-1)).clone())
        b.append(warmed.step(b[-1].argmax(-1)).clone())
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_static_generate_gives_transformers_greedy_tokens():
    model = tiny_llama()
    ids = _ids(1, 6)
    ref = hf_greedy(model, ids, 8)
    out, dec = static_generate(model, ids, 8)
    assert torch.equal(out, ref)
    assert dec.graph_reason.startswith("not asked for")
    eos = int(ref[0, 9])
    first = int((ref[0, 6:] == eos).nonzero()[0])  # where the greedy tokens first reach it
    seen = []
    out2, _ = static_generate(model, ids, 8, eos_token_id=eos, on_token=seen.append)
    assert torch.equal(out2, ref[:, :7 + first]) and len(seen) == first + 1  # stops at the end-of-sequence token


def test_static_decoder_refusals():
    model = tiny_llama()
    if not HAS_CUDA:
        with pytest.raises(ValueError, match="CUDA graphs need the model on a CUDA device"):
            StaticDecoder(model, 1, 8, graph=True)
    dec = StaticDecoder(model, 2, 8)
    with pytest.raises(RuntimeError, match="prefill a prompt before decoding"):
        dec.step(torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="does not leave room"):
        dec.prefill(_ids(2, 8))
    with pytest.raises(ValueError, match=r"prompts must be \[2, T\]"):
        dec.prefill(_ids(3, 4))
    dec.prefill(_ids(2, 7))
    dec.step(torch.zeros(2, dtype=torch.long))
    with pytest.raises(RuntimeError, match="static cache is full"):
        dec.step(torch.zeros(2, dtype=torch.long))


def test_static_runner_times_decoding_and_says_how():
    r = StaticRunner(tiny_llama(), what="transformers forward")
    assert r.decode(_ids(2, 8), 4) > 0
    assert r.decode(_ids(2, 8), 4) > 0  # the decoder of that size is reused
    assert len(r._decoders) == 1
    assert r.path == ("transformers forward (prompts); decode steps on a static KV cache: fptq fused decode step "
                      "(PyTorch norms, rotary, attention), eager (not asked for (no CUDA device, or graph=False))")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_graph_steps_match_eager_static_steps():
    model = _quantized().half().cuda()
    for m in model.modules():
        if hasattr(m, "set_backend"):
            m.set_backend("auto")
    ids = _ids().cuda()
    graph, eager = StaticDecoder(model, 2, 24), StaticDecoder(model, 2, 24, graph=False)
    a, b = [graph.prefill(ids).clone()], [eager.prefill(ids).clone()]
    for _ in range(6):
        t = a[-1].argmax(-1)
        a.append(graph.step(t).clone())
        b.append(eager.step(t).clone())
    assert graph.uses_graph, graph.graph_reason
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-3, rtol=1e-3)


def test_bench_times_gpu_models_on_the_static_graph_runner():
    """`fptq bench --device cuda` puts every model, the float one included, on the static cache + graph path
    (built here without touching CUDA: the runner reads the model's device only)."""
    from fptq.bench import _runner
    from fptq.runtime.timing import HFRunner

    from fptq.nn import set_act_mode

    model = _quantized()
    r = _runner(model, "cuda", True, True)
    assert isinstance(r, StaticRunner) and r.what == "transformers forward + Triton W4A8 kernels"
    set_act_mode(model, "none")  # a W4A16 row: the table names its kernel
    assert _runner(model, "cuda", True, True).what == "transformers forward + Triton W4A16 kernel (16-bit " \
        "activations, the packed codes on tensor cores)"
    plain = _runner(tiny_llama(), "cuda", False, False)
    assert type(plain) is HFRunner and plain.path == "transformers forward"


@pytest.mark.skipif(HAS_CUDA or os.environ.get("TRITON_INTERPRET") != "1" or importlib.util.find_spec("triton") is None,
                    reason="runs the Triton backend under Triton's CPU interpreter (a GPU runs the gpu-marked tests)")
@pytest.mark.parametrize("batch", [1, 2])
def test_triton_backend_decodes_on_the_static_cache_like_the_reference_backend(batch):
    """The GPU decode path's calls with the Triton backend, run on the CPU under Triton's interpreter: a prompt of
    up to 8 tokens per sequence through the exact grouped kernel, each single-token step through the GEMV that
    quantizes its own input. Logits equal the reference backend's to float32 rounding, no kernel fell back."""
    import warnings

    from fptq.kernels import triton_w4a8
    from fptq.nn import QuantLinear

    model = _quantized()
    ids = _ids(batch, 8 // batch)

    def use(backend):
        for m in model.modules():
            if isinstance(m, QuantLinear):
                m.set_backend(backend)

    use("reference")
    ref = _dynamic_reference(model, ids, 3)
    use("triton")
    with warnings.catch_warnings():
        # a kernel that falls back warns ("fptq triton ..."); warnings of others (Dynamo's on Python 3.13.0,
        # "Guards may run slower") stay warnings
        warnings.filterwarnings("error", message="fptq triton")
        dec = StaticDecoder(model, batch=batch, max_len=16)
        got = [dec.prefill(ids).clone()] + [dec.step(ref[i].argmax(-1)).clone() for i in range(3)]
    assert triton_w4a8.select_path(batch) == "gemv" and triton_w4a8.FUSED_GEMV_QUANT
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
