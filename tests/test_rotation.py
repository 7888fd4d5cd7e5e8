"""Rotating the residual stream and the heads' values (fptq.rotation): the float model's function is kept on
every architecture that can be rotated, outliers are spread, and the others are refused with the reason."""
from __future__ import annotations

import pytest
import torch

from fptq.models import get_adapter
from fptq.quant.hadamard import random_hadamard
from fptq.rotation import Rotation, rotate_model, rotation_for, rotation_problem

from .conftest import tiny_llama
from .models.test_architectures import tiny
from .test_residual import MODELS, _ids


@pytest.mark.parametrize("arch", ["llama", "llama-tied", "qwen2-tied-biases", "gemma"])
@pytest.mark.parametrize("heads", [False, True])
def test_rotation_keeps_the_model_function(arch, heads):
    model = MODELS[arch]().double()
    adapter = get_adapter(model)
    assert rotation_problem(model, adapter) is None
    x = _ids()
    with torch.no_grad():
        ref = model(x).logits
    emb_before = model.get_submodule(adapter.residual.embeddings).weight.detach().clone()
    rot = rotation_for(model, "residual+heads" if heads else "residual", seed=1)
    assert (rot.heads is not None) == heads
    rotate_model(model, adapter, rot)
    with torch.no_grad():
        out = model(x).logits
    assert torch.allclose(out, ref, atol=2e-6)  # the norms compute in float32 even in a float64 model
    emb = model.get_submodule(adapter.residual.embeddings).weight
    head = model.get_submodule(adapter.residual.head).weight
    assert not torch.allclose(emb, emb_before)  # the stream did turn
    assert head.data_ptr() != emb.data_ptr() and model.config.tie_word_embeddings is False
    for layer in adapter.layers(model):
        for n in adapter.residual.norms:
            assert torch.all(layer.get_submodule(n).weight + adapter.norm_weight_offset == 1)


def test_the_identity_rotation_folds_the_norms_alone():
    model = tiny_llama(tie_word_embeddings=True).double()
    adapter = get_adapter(model)
    x = _ids()
    emb = model.model.embed_tokens.weight.detach().clone()
    g = model.model.norm.weight.detach().clone()
    with torch.no_grad():
        ref = model(x).logits
    rotate_model(model, adapter, Rotation(torch.eye(model.config.hidden_size, dtype=torch.float64)))
    with torch.no_grad():
        assert torch.allclose(model(x).logits, ref, atol=2e-6)
    assert torch.all(model.model.norm.weight == 1)
    assert torch.equal(model.model.embed_tokens.weight, emb)
    assert torch.allclose(model.lm_head.weight, emb * g.view(1, -1), atol=1e-12)


def test_rotation_spreads_an_outlier_channel_of_the_stream():
    model = tiny_llama(outliers=True).double()
    adapter = get_adapter(model)
    seen = {}

    def grab(_m, args):
        seen["x"] = args[0].detach().abs()

    h = model.model.layers[1].self_attn.q_proj.register_forward_pre_hook(grab)
    x = _ids()
    with torch.no_grad():
        model(x)
        before = seen["x"].amax(dim=(0, 1))
        rotate_model(model, adapter, Rotation(random_hadamard(model.config.hidden_size, seed=0)))
        model(x)
        after = seen["x"].amax(dim=(0, 1))
    h.remove()
    # max over channels relative to the median channel: flatter after the rotation
    assert (after.max() / after.median()) < 0.5 * (before.max() / before.median())


@pytest.mark.parametrize("arch", ["gemma2", "gemma3_text"])
def test_post_norm_architectures_are_refused(arch):
    model = tiny(arch)
    adapter = get_adapter(model)
    assert "do not fold" in rotation_problem(model, adapter)
    with pytest.raises(ValueError, match="cannot rotate the residual stream"):
        rotate_model(model, adapter, Rotation(random_hadamard(model.config.hidden_size)))


def test_wrong_sizes_are_refused():
    model = tiny_llama()
    adapter = get_adapter(model)
    with pytest.raises(ValueError, match=r"must be \[64, 64\]"):
        rotate_model(model, adapter, Rotation(torch.eye(32)))
    with pytest.raises(ValueError, match="head rotation must be"):
        rotate_model(model, adapter, Rotation(torch.eye(64), torch.eye(3)))


# --- QuantConfig.rotation: the pipeline, the layer-by-layer writer, resume ---------------------------------

def test_quantize_with_rotation_keeps_accuracy_untied_and_round_trips(tmp_path):
    import fptq

    from .conftest import as_stored, sqnr_db

    model = tiny_llama(tie_word_embeddings=True)
    x = _ids(2, 16, seed=3)
    with torch.no_grad():
        ref = model(x).logits
    calib = _ids(8, 32, seed=4)
    cfg = fptq.method_config("fptq", group_size=32, thresholds=(2.0, 40.0), rotation="residual+heads")
    plan = fptq.quantize(model, cfg, calib, device="cpu", progress=False)
    assert plan.config["rotation"] == "residual+heads" and model.config.tie_word_embeddings is False
    emb = tiny_llama(tie_word_embeddings=True).model.embed_tokens.weight.double()
    r = random_hadamard(model.config.hidden_size, seed=0)
    # the embedding was turned by the seed-0 Hadamard matrix, then sorted (residual_order="max" in fptq)
    turned = (emb @ r).float()
    dist = torch.cdist(model.model.embed_tokens.weight.detach().T, turned.T).detach()
    assert torch.equal(dist.argmin(1).sort().values, torch.arange(turned.shape[1]))  # a permutation of its columns
    assert float(dist.min(1).values.max()) < 1e-3 < float(dist.kthvalue(2, 1).values.min())
    with torch.no_grad():
        out = model(x).logits
    assert sqnr_db(ref, out) > 10
    fptq.save(model, plan, tmp_path / "q")
    loaded = fptq.load(tmp_path / "q", backend="reference")
    assert loaded.config.tie_word_embeddings is False
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, as_stored(model)(x).logits)


def test_rotation_is_skipped_with_a_warning_where_it_cannot_be_exact(caplog):
    import fptq

    model = tiny("gemma2")
    with caplog.at_level("WARNING", logger="fptq.rotation"):
        fptq.quantize(model, fptq.method_config("rtn-w4a16", group_size=32, rotation="residual"), _ids(2, 16),
                      device="cpu", progress=False)
    assert "rotation 'residual' skipped" in caplog.text and "do not fold" in caplog.text


def test_unknown_rotation_is_refused():
    import fptq

    with pytest.raises(ValueError, match="rotation must be 'none', 'residual' or 'residual\\+heads'"):
        fptq.method_config("fptq", rotation="hadamard")


def _saved(tmp_path, dtype=torch.float32, **kw):
    from .conftest import make_tokenizer

    d = tmp_path / "m"
    tiny_llama(num_hidden_layers=3, **kw).to(dtype).save_pretrained(d, max_shard_size="60KB")
    make_tokenizer().save_pretrained(d)
    return d


SETTINGS = dict(nsamples=4, seqlen=32, device="cpu", progress=False)
CFG = dict(group_size=32, thresholds=(2.0, 20.0), rotation="residual+heads")


@pytest.mark.parametrize("tied,dtype", [(False, torch.float32), (True, torch.float32), (True, torch.bfloat16)])
def test_layer_by_layer_run_rotates_like_the_in_memory_api(calib_file, tmp_path, tied, dtype):
    """`fptq quantize --rotation` on a directory of safetensors (one layer in memory at a time; the embedding,
    final norm and lm_head turned as they are written) gives the model the in-memory API gives."""
    import fptq
    from fptq.workflow import quantize_to_dir

    from .conftest import as_stored

    d = _saved(tmp_path, dtype, tie_word_embeddings=tied)
    out = tmp_path / "q"
    _, report = quantize_to_dir(str(d), out, fptq.method_config("fptq", **CFG), calib=str(calib_file), **SETTINGS)
    assert report["layer_by_layer_loading"] is True
    model, tok, _ = fptq.load_float_model(str(d))
    windows = fptq.calibration_windows(tok, fptq.read_text(str(calib_file)), 4, 32, 0)
    plan = fptq.quantize(model, fptq.method_config("fptq", **CFG), windows, device="cpu", progress=False)
    loaded = fptq.load(out, backend="reference")
    assert loaded.config.tie_word_embeddings is False
    ids = _ids(2, 16, seed=2)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, as_stored(model)(ids).logits)
    assert loaded.fptq_plan.to_dict()["layers"] == plan.to_dict()["layers"]


@pytest.mark.parametrize("tied", [False, True])
def test_resumed_rotated_run_is_byte_identical(calib_file, tmp_path, tied):
    import fptq
    from fptq.io import weight_files
    from fptq.resume import QuantizeInterrupted
    from fptq.workflow import quantize_to_dir

    d = _saved(tmp_path, tie_word_embeddings=tied)  # tied: the head stored as a transform (fptq.stored_head)
    cfg = fptq.method_config("fptq", **CFG)
    ref, out = tmp_path / "ref", tmp_path / "q"
    quantize_to_dir(str(d), ref, cfg, calib=str(calib_file), **SETTINGS)

    def stop(res):
        if res.index == 1:
            raise KeyboardInterrupt

    with pytest.raises(QuantizeInterrupted):
        quantize_to_dir(str(d), out, cfg, calib=str(calib_file), on_layer_done=stop, **SETTINGS)
    quantize_to_dir(str(d), out, cfg, calib=str(calib_file), resume=True, **SETTINGS)
    assert {f: (out / f).read_bytes() for f in weight_files(out)} == {f: (ref / f).read_bytes() for f in weight_files(ref)}


def test_rotated_outside_entries_turn_the_head_and_clear_the_final_norm():
    from fptq.rotation import Rotation, rotated_outside_entries
    from fptq.st import tensor_entry

    model = tiny_llama(tie_word_embeddings=True)
    adapter = get_adapter(model)
    emb = model.model.embed_tokens.weight.detach().clone()
    g = torch.rand(emb.shape[1]) + 0.5
    r = random_hadamard(emb.shape[1], seed=5)
    entries = [tensor_entry("model.embed_tokens.weight", emb), tensor_entry("model.norm.weight", g)]
    out = {e.name: e for e in rotated_outside_entries(entries, adapter, Rotation(r))}
    assert set(out) == {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    torch.testing.assert_close(out["model.embed_tokens.weight"].read(), (emb.double() @ r).float())
    torch.testing.assert_close(out["lm_head.weight"].read(), ((emb * g).double() @ r).float())
    assert torch.equal(out["model.norm.weight"].read(), torch.ones_like(g))
    assert torch.equal(entries[0].read(), emb)  # the source tensors are left as they were


def test_heads_rotation_falls_back_to_the_residual_one_without_a_head_pair(caplog):
    from fptq.rotation import prepare_rotation

    model = tiny_llama()
    adapter = get_adapter(model).with_unfoldable({"self_attn.v_proj"}, "test: no head pair")
    with caplog.at_level("WARNING", logger="fptq.rotation"):
        rot, load = prepare_rotation(model, adapter, "residual+heads", 0, None)
    assert rot is not None and rot.heads is None and load is None
    assert "no v_proj -> o_proj pair" in caplog.text and "only the residual stream is rotated" in caplog.text


def test_factored_rotation_turns_the_weights_like_the_dense_one():
    """The Hadamard matrix's Kronecker factors (what ``rotation_for`` uses from ``FACTORED_MIN_HIDDEN`` on) turn the
    weights as the dense product does up to float64 rounding (one float32 ulp at most after the cast); a size
    without a Hadamard matrix (a random orthogonal one) multiplies densely."""
    from fptq.rotation import random_rotation

    from fptq.quant.hadamard import random_hadamard_factors
    from fptq.rotation import FACTORED_MIN_HIDDEN

    model = MODELS["llama"]()
    adapter = get_adapter(model)
    h = model.config.hidden_size
    dense = rotation_for(model, "residual+heads", seed=2)
    assert h < FACTORED_MIN_HIDDEN and dense.factors is None  # small models keep the dense product
    rot = Rotation(dense.residual, dense.heads, random_hadamard_factors(h, 2))
    w = torch.randn(h, 7, dtype=torch.float64)
    torch.testing.assert_close(rot.turn_t(w), dense.residual.T @ w, rtol=0, atol=1e-12)
    x = torch.randn(5, model.config.hidden_size, dtype=torch.float64)
    torch.testing.assert_close(rot.turn(x), x @ rot.residual, rtol=0, atol=1e-12)
    twin = MODELS["llama"]()
    rotate_model(model, adapter, rot)
    rotate_model(twin, adapter, dense)
    for (name, a), (_, b) in zip(model.state_dict().items(), twin.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=2 ** -23, atol=1e-7, msg=name)
    odd = Rotation(random_rotation(10, 0))
    y = torch.randn(3, 10, dtype=torch.float64)
    assert odd.factors is None and torch.equal(odd.turn(y), y @ odd.residual)


def test_large_hidden_sizes_get_the_factored_rotation():
    from types import SimpleNamespace

    from fptq.rotation import FACTORED_MIN_HIDDEN, random_rotation

    big = SimpleNamespace(config=SimpleNamespace(hidden_size=4096, num_attention_heads=32, head_dim=128))
    rot = rotation_for(big, "residual", seed=0)
    assert FACTORED_MIN_HIDDEN <= 4096 and rot.factors is not None
    assert rot.dense is None and rot.shape == (4096, 4096)  # the 128 MiB matrix is not built to turn weights
    assert [f.shape[0] for f in rot.factors[1]] == [64, 64]
    assert torch.equal(rot.residual, random_rotation(4096, 0))  # built on demand, the dense draw's bits
    with pytest.raises(ValueError, match="dense"):
        Rotation()
    x = torch.randn(3, 4096, dtype=torch.float64)
    torch.testing.assert_close(rot.turn(x), x @ rot.residual, rtol=0, atol=1e-11)
