"""Sorting the residual stream's channels (fptq.residual, QuantConfig.residual_order): exact on every
architecture with a residual table, ordered by the norms' outputs, refused where it cannot be exact."""
from __future__ import annotations

import logging

import pytest
import torch

import fptq
from fptq.errors import FptqError
from fptq.models import get_adapter
from fptq.calibrate import capture_layer0_inputs
from fptq.residual import (
    float_pass_maxima,
    permute_residual,
    residual_channel_maxima,
    residual_inputs,
    residual_order,
    residual_problem,
)

from .conftest import as_stored, sqnr_db, tiny_llama
from .models.test_architectures import tiny

CPU = torch.device("cpu")


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)).eval()


MODELS = {
    "llama": lambda: tiny_llama(),
    "llama-tied": lambda: tiny_llama(tie_word_embeddings=True),
    "qwen2-tied-biases": _qwen2,
    "gemma": lambda: tiny("gemma"),
    "gemma2": lambda: tiny("gemma2"),
    "gemma3_text": lambda: tiny("gemma3_text"),
}


def _ids(n=3, s=20, seed=0):
    return torch.randint(0, 300, (n, s), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", list(MODELS))
def test_permuting_the_residual_stream_keeps_the_model_function(arch):
    model = MODELS[arch]()
    adapter = get_adapter(model)
    assert residual_problem(model, adapter) is None
    x = _ids()
    with torch.no_grad():
        ref = model(x).logits
    emb = model.get_submodule(adapter.residual.embeddings).weight.detach().clone()
    perm = torch.randperm(model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    permute_residual(model, adapter, perm)
    assert torch.equal(model.get_submodule(adapter.residual.embeddings).weight, emb[:, perm])
    with torch.no_grad():
        out = model(x).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert not torch.equal(perm, torch.arange(len(perm)))


def test_channel_maxima_are_the_norm_outputs_largest_values_and_the_order_sorts_them():
    model = tiny_llama()  # planted: input_layernorm gains x8 on channels 0-2, post_attention x30 on 5-6
    adapter = get_adapter(model)
    calib = _ids(5, 16, seed=2)
    got = residual_channel_maxima(model, adapter, capture_layer0_inputs(model, adapter, calib, 2, CPU), CPU)
    want = torch.zeros(model.config.hidden_size)

    def hook(_m, _i, out):
        want.copy_(torch.maximum(want, out.abs().reshape(-1, out.shape[-1]).amax(0)))

    hs = [n.register_forward_hook(hook) for layer in model.model.layers
          for n in (layer.input_layernorm, layer.post_attention_layernorm)]
    with torch.no_grad():
        model(calib)
    for h in hs:
        h.remove()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    perm = residual_order(got)
    assert set(perm[:2].tolist()) == {5, 6}
    assert bool((got[perm][:-1] >= got[perm][1:]).all())


def test_float_pass_also_gives_each_groups_largest_input():
    """What the dynamic budget predicts the thresholds from: per layer and fold group, max|x| of the input."""
    model = tiny_llama()
    adapter = get_adapter(model)
    calib = _ids(5, 16, seed=2)
    maxima, groups = float_pass_maxima(model, adapter, capture_layer0_inputs(model, adapter, calib, 2, CPU), CPU)
    assert torch.equal(maxima, residual_channel_maxima(model, adapter,
                                                       capture_layer0_inputs(model, adapter, calib, 2, CPU), CPU))
    want = [[0.0] * len(adapter.groups) for _ in model.model.layers]

    def hook(i, j):
        def record(_m, args):
            want[i][j] = max(want[i][j], float(args[0].abs().max()))
        return record

    hs = [layer.get_submodule(g.consumers[0]).register_forward_pre_hook(hook(i, j))
          for i, layer in enumerate(model.model.layers) for j, g in enumerate(adapter.groups)]
    with torch.no_grad():
        model(calib)
    for h in hs:
        h.remove()
    assert len(groups) == len(want) and all(len(r) == len(adapter.groups) for r in groups)
    torch.testing.assert_close(torch.tensor(groups), torch.tensor(want), rtol=1e-5, atol=1e-6)
    assert max(max(r) for r in groups) > 20  # the planted outlier channels reach the inputs


def test_float_pass_of_a_float16_model_runs_in_the_statistics_passs_bfloat16():
    """A CPU has no fast float16 matrix products: a float16 model's float pass runs under the bfloat16 autocast of
    the statistics pass (a 7B-shaped layer: 100 s in float16, ~25 s in bfloat16 on 2 cores), with the float32
    pass's maxima to bfloat16's precision; float32 and bfloat16 models keep their own dtype."""
    from fptq.calibrate import float_pass_dtype

    bf16, fp32 = fptq.QuantConfig(calib_dtype="bfloat16"), fptq.QuantConfig(calib_dtype="float32")
    assert float_pass_dtype(bf16, torch.float16) == torch.bfloat16
    assert float_pass_dtype(bf16, torch.float32) is None and float_pass_dtype(bf16, torch.bfloat16) is None
    assert float_pass_dtype(fp32, torch.float16) is None

    model = tiny_llama()
    adapter = get_adapter(model)
    calib = _ids(4, 16, seed=3)
    ref, ref_groups = float_pass_maxima(model, adapter, capture_layer0_inputs(model, adapter, calib, 2, CPU), CPU)
    half = tiny_llama().half()
    seen = []
    hook = half.model.layers[0].mlp.down_proj.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    got, groups = float_pass_maxima(half, adapter, capture_layer0_inputs(half, adapter, calib, 2, CPU), CPU,
                                    compute_dtype=torch.bfloat16)
    hook.remove()
    assert seen and set(seen) == {torch.bfloat16}
    torch.testing.assert_close(got, ref, rtol=0.05, atol=0.05)
    torch.testing.assert_close(torch.tensor(groups), torch.tensor(ref_groups), rtol=0.05, atol=0.05)


def test_quantize_with_residual_order_sorts_then_quantizes_and_round_trips(tmp_path):
    model = tiny_llama()
    x = _ids(2, 16, seed=3)
    with torch.no_grad():
        ref = model(x).logits
    calib = _ids(8, 32, seed=4)
    cfg = fptq.method_config("fptq", group_size=32, thresholds=(2.0, 40.0), residual_order="max", rotation="none")
    plan = fptq.quantize(model, cfg, calib, device="cpu", progress=False)
    assert plan.config["residual_order"] == "max"
    # the embedding's largest-norm-output channels come first now
    fresh = tiny_llama()
    inputs = residual_inputs(capture_layer0_inputs(fresh, get_adapter(fresh), calib, 8, CPU))
    maxima = residual_channel_maxima(fresh, get_adapter(fresh), inputs, CPU)
    assert torch.equal(model.model.embed_tokens.weight, tiny_llama().model.embed_tokens.weight[:, residual_order(maxima)])
    with torch.no_grad():
        out = model(x).logits
    assert sqnr_db(ref, out) > 10
    fptq.save(model, plan, tmp_path / "q")
    loaded = fptq.load(tmp_path / "q", backend="reference")
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, as_stored(model)(x).logits)  # the permuted tensors are what is saved


def test_residual_order_refusals_and_skips(caplog):
    calib = _ids(4, 16)
    cfg = fptq.method_config("fptq", group_size=32, residual_order="max")
    with pytest.raises(FptqError, match="needs the order it measured"):
        fptq.quantize(tiny_llama(), cfg, calib, device="cpu", progress=False, start_layer=1,
                      dynamic_prediction=[0, 0])
    # a parameter the table does not place: refused before anything changes
    model = tiny_llama()
    model.model.layers[0].extra = torch.nn.Linear(64, 4)
    problem = residual_problem(model, get_adapter(model))
    assert "model.layers.0.extra.weight" in problem
    emb = model.model.embed_tokens.weight.detach().clone()
    with pytest.raises(FptqError, match="residual_order='none'"):
        permute_residual(model, get_adapter(model), torch.arange(64).flip(0))
    assert torch.equal(model.model.embed_tokens.weight, emb)
    with pytest.raises(FptqError, match="permutation"):
        permute_residual(tiny_llama(), get_adapter(tiny_llama()), torch.zeros(64, dtype=torch.long))
    # an architecture without a residual table (OPT) is quantized as it is, with a warning
    opt = tiny("opt")
    emb = opt.model.decoder.embed_tokens.weight.detach().clone()
    with caplog.at_level(logging.WARNING, logger="fptq"):
        fptq.quantize(opt, cfg, calib, device="cpu", progress=False)
    assert "residual stream left in its order" in caplog.text
    assert torch.equal(opt.model.decoder.embed_tokens.weight, emb)
    with pytest.raises(ValueError, match="residual_order"):
        fptq.method_config("fptq", residual_order="weight")


def test_order_is_measured_on_strided_whole_batches_of_the_captured_inputs():
    model = tiny_llama()
    adapter = get_adapter(model)
    inputs = capture_layer0_inputs(model, adapter, _ids(40, 8, seed=5), 4, CPU)  # 10 batches of 4 windows
    sub = residual_inputs(inputs, windows=12)
    assert [id(h) for h in sub.hidden] == [id(inputs.hidden[b]) for b in (0, 3, 6)]
    assert sub.kwargs == [inputs.kwargs[b] for b in (0, 3, 6)]
    assert len(residual_inputs(inputs, windows=1000).hidden) == 10
    before = list(inputs.hidden)
    residual_channel_maxima(model, adapter, sub, CPU)
    assert all(a is b for a, b in zip(inputs.hidden, before))  # the captured inputs are left as they were


def _saved(tmp_path, **kw):
    from .conftest import make_tokenizer

    d = tmp_path / "m"
    tiny_llama(num_hidden_layers=3, **kw).save_pretrained(d, max_shard_size="60KB")
    make_tokenizer().save_pretrained(d)
    return d


SETTINGS = dict(nsamples=4, seqlen=32, device="cpu", progress=False)
CFG = dict(group_size=32, thresholds=(2.0, 20.0), residual_order="max")


@pytest.mark.parametrize("tied", [False, True])
def test_layer_by_layer_run_sorts_the_residual_stream_like_the_in_memory_api(calib_file, tmp_path, tied):
    """`fptq quantize --residual-order max` (one layer in memory at a time, the tensors outside the layers copied
    from the source files and permuted as they are written) gives the model the in-memory API gives."""
    from fptq.workflow import quantize_to_dir

    d = _saved(tmp_path, tie_word_embeddings=tied)
    out = tmp_path / "q"
    _, report = quantize_to_dir(str(d), out, fptq.method_config("fptq", **CFG), calib=str(calib_file), **SETTINGS)
    assert report["layer_by_layer_loading"] is True
    model, tok, _ = fptq.load_float_model(str(d))
    src_emb = model.model.embed_tokens.weight.detach().clone()
    windows = fptq.calibration_windows(tok, fptq.read_text(str(calib_file)), 4, 32, 0)
    plan = fptq.quantize(model, fptq.method_config("fptq", **CFG), windows, device="cpu", progress=False)
    loaded = fptq.load(out, backend="reference")
    assert not torch.equal(loaded.model.embed_tokens.weight, src_emb.to(loaded.model.embed_tokens.weight.dtype))
    ids = _ids(2, 16, seed=2)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, as_stored(model)(ids).logits)
    assert loaded.fptq_plan.to_dict()["layers"] == plan.to_dict()["layers"]


@pytest.mark.parametrize("k", [0, 1])
def test_resumed_run_keeps_the_residual_order_and_is_byte_identical(calib_file, tmp_path, k):
    from fptq.io import weight_files
    from fptq.resume import QuantizeInterrupted, partial_dir
    from fptq.workflow import quantize_to_dir

    d = _saved(tmp_path)
    cfg = fptq.method_config("fptq", **CFG)
    ref, out = tmp_path / "ref", tmp_path / "q"
    quantize_to_dir(str(d), ref, cfg, calib=str(calib_file), **SETTINGS)

    def stop(res):
        if res.index == k:
            raise KeyboardInterrupt

    with pytest.raises(QuantizeInterrupted):
        quantize_to_dir(str(d), out, cfg, calib=str(calib_file), on_layer_done=stop, **SETTINGS)
    assert (partial_dir(out) / "residual-order.safetensors").is_file()
    quantize_to_dir(str(d), out, cfg, calib=str(calib_file), resume=True, **SETTINGS)
    assert {f: (out / f).read_bytes() for f in weight_files(out)} == {f: (ref / f).read_bytes() for f in weight_files(ref)}


def test_permuted_entry_writes_the_selected_order():
    import io

    from fptq.st import permuted_entry, tensor_entry

    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    perm = torch.tensor([2, 0, 3, 1])
    e = permuted_entry(tensor_entry("w", t), 1, perm)
    assert torch.equal(e.read(), t[:, perm]) and e.nbytes == t.numel() * 4
    buf = io.BytesIO()
    e.write(buf)
    assert torch.equal(torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.float32).reshape(3, 4), t[:, perm])
    with pytest.raises(FptqError, match="cannot permute dimension 0"):
        permuted_entry(tensor_entry("w", t), 0, perm)
