"""The layer-by-layer pipeline on tiny random LLaMA models."""
import copy
import math

import pytest
import torch

import fptq
from fptq.calibrate import capture_layer0_inputs, run_layer
from fptq.config import ActPolicy, Equalization
from fptq.models import get_adapter
from fptq.nn import QuantLinear

from .conftest import sqnr_db, tiny_llama


def _calib(n=8, s=32, vocab=300, seed=0):
    return torch.randint(0, vocab, (n, s), generator=torch.Generator().manual_seed(seed))


def _qkv_input(model, ids, layer=0):
    """The input of decoder layer ``layer``'s q/k/v (what q_proj receives) for ``ids``."""
    captured = {}
    h = model.model.layers[layer].self_attn.q_proj.register_forward_hook(
        lambda m, i, o: captured.setdefault("x", i[0].detach()))
    model(ids)
    h.remove()
    return captured["x"]


def test_lae_folding_leaves_float_outputs_unchanged():
    """Equalize every foldable group (incl. v->o under GQA and up->down) with
    16-bit weights and activations: the model must compute the same function."""
    model = tiny_llama()
    ids = _calib()
    ref = model(ids).logits
    from fptq.folding import equalization_scales as _equalization_scales
    from fptq.quant import fold_into_linear_outputs, fold_into_norm, scale_linear_inputs

    adapter = get_adapter(model)
    cfg = fptq.method_config("fptq")
    for layer in adapter.layers(model):
        for g in adapter.groups:
            k = layer.get_submodule(g.consumers[0]).in_features
            absmax = torch.rand(k) * 200 + 0.5
            s_in, s_out = _equalization_scales(cfg, g, layer, absmax, (4, 2))
            prod = layer.get_submodule(g.producer)
            (fold_into_norm if g.kind == "norm" else fold_into_linear_outputs)(prod, s_out)
            for c in g.consumers:
                scale_linear_inputs(layer.get_submodule(c), s_in)
    out = model(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("eq", ["lae", "smoothquant"])
def test_pipeline_folds_are_exact_with_8bit_weights_and_dynamic_acts(eq):
    """The pipeline's own folds (through the norms, v->o, up->down) keep the
    function: with near-lossless W8 per-channel + float activations the result
    is close to float, and much closer than without the folds being exact."""
    model = tiny_llama()
    ids = _calib()
    ref = model(ids).logits
    cfg = fptq.QuantConfig(method="test", wbits=8, abits=16, group_size=-1, act_policy=ActPolicy.FLOAT,
                           equalization=Equalization.NONE)
    m2 = copy.deepcopy(model)
    fptq.quantize(m2, cfg, ids, device="cpu", progress=False)
    base = sqnr_db(ref, m2(ids).logits)
    cfg_eq = fptq.QuantConfig(method="test", wbits=8, abits=8, group_size=-1, act_policy=ActPolicy.DYNAMIC,
                              equalization=Equalization(eq))
    m3 = copy.deepcopy(model)
    plan = fptq.quantize(m3, cfg_eq, ids, device="cpu", progress=False)
    assert all(lp.equalization == eq for lp in plan.layers.values())
    assert sqnr_db(ref, m3(ids).logits) > 25 and base > 30


def test_plan_has_all_three_strategies_and_an_entry_per_linear():
    model = tiny_llama()
    cfg = fptq.method_config("fptq", thresholds=(2.0, 20.0), group_size=32)
    plan = fptq.quantize(model, cfg, _calib(), device="cpu", progress=False)
    assert len(plan.layers) == 2 * 7
    counts = plan.counts()
    assert set(counts) == {"static_tensor", "lae_static_tensor", "dynamic_token"}, counts
    for name, lp in plan.layers.items():
        mod = model.get_submodule(name)
        assert isinstance(mod, QuantLinear)
        expected = {"static_tensor": "static_tensor", "lae_static_tensor": "static_tensor",
                    "dynamic_token": "dynamic_token"}[lp.strategy]
        assert mod.act_mode == expected
        assert (lp.act_scale is not None) == (expected == "static_tensor")
        if lp.strategy == "lae_static_tensor":
            assert lp.equalization == "lae" and lp.equalization_folded_into
            # after LAE the input range is compressed to about log2(2 + max); the default searches the power
            # of the scales, and power 0 leaves the input as it was
            assert lp.equalization_power in (0.0, 0.5, 1.0)
            if lp.equalization_power > 0:
                assert lp.act_absmax_equalized < lp.act_absmax
            else:
                assert lp.act_absmax_equalized == pytest.approx(lp.act_absmax)
    # q/k/v share their input, hence their strategy
    for i in range(2):
        s = {plan.layers[f"model.layers.{i}.self_attn.{p}_proj"].strategy for p in "qkv"}
        assert len(s) == 1


def test_equalize_into_norms_leaves_linear_producers_alone():
    """With ``equalize_into="norms"`` only the norms take scales: v_proj and up_proj keep their float rows,
    and a Linear-fed layer in the LAE band runs dynamic per-token (the plan says why)."""
    model = tiny_llama()
    cfg = fptq.method_config("fptq", thresholds=(0.5, 1e4), group_size=32, equalize_into="norms")
    plan = fptq.quantize(model, cfg, _calib(), device="cpu", progress=False)
    linear_fed = [lp for n, lp in plan.layers.items() if n.endswith(("o_proj", "down_proj"))]
    assert all(lp.equalization == "none" for lp in linear_fed)
    assert not any(lp.strategy == "lae_static_tensor" for lp in linear_fed)
    moved = [lp for lp in linear_fed if lp.equalization_note]
    assert moved and all("equalize_into" in lp.equalization_note and lp.strategy == "dynamic_token" for lp in moved)
    norm_fed = [lp for n, lp in plan.layers.items() if lp.strategy == "lae_static_tensor"]
    assert norm_fed and all(lp.equalization_folded_into.endswith("layernorm") for lp in norm_fed)
    # the preset that mirrors llm-compressor's log-equalization folds into the norms only
    assert fptq.method_config("lae-dynamic-w4a8").equalize_into == "norms"
    assert fptq.method_config("fptq").equalize_into == "all"
    with pytest.raises(ValueError, match="equalize_into"):
        fptq.method_config("fptq", equalize_into="linears")


@pytest.mark.parametrize("method,floor_db", [
    ("fptq", 8), ("naive-w4a8", 5), ("dynamic-w4a8", 8), ("rtn-w4a16", 10), ("gptq-w4a16", 10),
    ("smoothquant-w8a8", 20), ("lae-dynamic-w4a8", 8),
])
def test_methods_reach_sqnr_floor(method, floor_db):
    model = tiny_llama(outliers=False)
    ids = _calib(16, 32)
    ref = model(ids).logits
    cfg = fptq.method_config(method, group_size=32, thresholds=(2.0, 20.0))
    fptq.quantize(model, cfg, ids, device="cpu", progress=False)
    assert sqnr_db(ref, model(ids).logits) > floor_db


def test_gptq_beats_rtn_end_to_end():
    model = tiny_llama(outliers=False, hidden_size=128, intermediate_size=256)
    ids = _calib(16, 64)
    ref = model(ids).logits
    out = {}
    for m in ("rtn-w4a16", "gptq-w4a16"):
        mm = copy.deepcopy(model)
        fptq.quantize(mm, fptq.method_config(m, group_size=32), ids, device="cpu", progress=False)
        out[m] = sqnr_db(ref, mm(ids).logits)
    assert out["gptq-w4a16"] > out["rtn-w4a16"]


def test_gptq_with_a_float64_hessian_sum_matches_the_float32_running_average():
    """Only float32 rounding separates the two Hessian accumulations: end to end they give models within
    0.5 dB SQNR of each other (and both well above round-to-nearest's floor checked above)."""
    model = tiny_llama(outliers=False, hidden_size=128, intermediate_size=256)
    ids = _calib(16, 64)
    ref = model(ids).logits
    out = {}
    for dtype in ("float32", "float64"):
        mm = copy.deepcopy(model)
        cfg = fptq.method_config("gptq-w4a16", group_size=32, gptq_hessian_dtype=dtype)
        fptq.quantize(mm, cfg, ids, device="cpu", progress=False)
        out[dtype] = sqnr_db(ref, mm(ids).logits)
    assert abs(out["float64"] - out["float32"]) < 0.5, out


def _gptq_clip_variants(variants: dict[str, dict]) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """``gptq-w4a16`` (group 32) with each variant's overrides on copies of one tiny model: the logits' SQNR
    against the float model's, and down_proj's weight scales, by label."""
    model = tiny_llama(outliers=False, hidden_size=128, intermediate_size=256)
    ids = _calib(16, 64)
    ref = model(ids).logits
    out, scales = {}, {}
    for label, over in variants.items():
        mm = copy.deepcopy(model)
        fptq.quantize(mm, fptq.method_config("gptq-w4a16", group_size=32, **over), ids, device="cpu", progress=False)
        out[label] = sqnr_db(ref, mm(ids).logits)
        scales[label] = mm.get_submodule("model.layers.0.mlp.down_proj").w_scales.float()
    return out, scales


def test_gptq_clip_search_reaches_the_weights_with_either_objective():
    """``weight_clip_search`` with GPTQ shrinks some group scales below absmax/7.5 (the output objective
    scored from the Hessian, so differently from the weight one) and keeps the model as close to the float
    one as GPTQ without the search (within 1 dB SQNR)."""
    out, scales = _gptq_clip_variants({"plain": {}, "weight": {"weight_clip_search": True},
                                       "output": {"weight_clip_search": True, "weight_clip_objective": "output"}})
    assert (scales["weight"] < scales["plain"]).any() and not torch.equal(scales["weight"], scales["output"])
    assert out["weight"] > out["plain"] - 1 and out["output"] > out["plain"] - 1, out


def test_gptq_clip_rows_best_mixes_clipped_and_unclipped_rows():
    """``weight_clip_rows="best"``: each output row of a GPTQ Linear ends with the searched clip's scales or the
    group extremes' (some of each on down_proj here), and the model stays as close to the float one as with
    the clip on every row (within 1 dB SQNR); a bad value is refused by name."""
    out, scales = _gptq_clip_variants({"none": {"weight_clip_search": False}, "all": {"weight_clip_search": True},
                                       "best": {"weight_clip_search": True, "weight_clip_rows": "best"}})
    clipped = (scales["best"] == scales["all"]).all(1) & ~(scales["best"] == scales["none"]).all(1)
    plain = (scales["best"] == scales["none"]).all(1) & ~(scales["best"] == scales["all"]).all(1)
    assert clipped.any() and plain.any(), (int(clipped.sum()), int(plain.sum()))
    assert out["best"] > out["all"] - 1, out
    with pytest.raises(ValueError, match="weight_clip_rows"):
        fptq.method_config("fptq", weight_clip_rows="some")


def test_ragged_groups_and_odd_hidden_size():
    model = tiny_llama(hidden_size=72, intermediate_size=100, num_attention_heads=4, num_key_value_heads=4)
    ids = _calib()
    ref = model(ids).logits
    plan = fptq.quantize(model, fptq.method_config("fptq", group_size=32), ids, device="cpu", progress=False)
    q = model.get_submodule("model.layers.0.mlp.down_proj")
    assert q.w_scales.shape == (72, 4)  # 100 = 32 + 32 + 32 + 4
    assert sqnr_db(ref, model(ids).logits) > 8
    assert len(plan.layers) == 14


def test_captured_inputs_reproduce_the_model():
    """Layer-by-layer execution over cached inputs gives the same hidden states as a full forward."""
    model = tiny_llama()
    ids = _calib(4, 16)
    adapter = get_adapter(model)
    inputs = capture_layer0_inputs(model, adapter, ids, 2, torch.device("cpu"))
    for layer in adapter.layers(model):
        run_layer(layer, inputs, torch.device("cpu"), replace=True)
    hidden = torch.cat(inputs.hidden)
    full = model.model(ids).last_hidden_state
    torch.testing.assert_close(model.model.norm(hidden), full, rtol=1e-5, atol=1e-5)


def test_nan_weights_are_reported_with_the_layer_name():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(fptq.FptqError, match=r"model\.layers\.1"):
        fptq.quantize(model, fptq.method_config("fptq"), _calib(), device="cpu", progress=False)


def test_unsupported_architecture_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(fptq.FptqError, match="unsupported architecture 'gpt2'.*llama"):
        fptq.quantize(m, fptq.method_config("fptq"), _calib(vocab=50), device="cpu", progress=False)


def test_offload_device_choice_and_errors():
    from fptq.errors import FptqError
    from fptq.pipeline import offload_device

    cpu = torch.device("cpu")
    assert offload_device(False, cpu) == cpu and offload_device(True, cpu) == cpu
    assert offload_device("cpu", cpu) == cpu
    with pytest.raises(FptqError, match="not a device"):
        offload_device("gpu7", cpu)
    if not torch.cuda.is_available():
        with pytest.raises(FptqError, match="CUDA"):
            offload_device("cuda:1", cpu)
    # offloading changes where activations live, not the numbers
    ids = _calib()
    a, b = tiny_llama(), tiny_llama()
    cfg = fptq.method_config("fptq", thresholds=(2.0, 20.0), group_size=32)
    pa = fptq.quantize(a, cfg, ids, device="cpu", progress=False)
    pb = fptq.quantize(b, cfg, ids, device="cpu", offload="cpu", progress=False)
    assert pa.to_dict() == pb.to_dict()
    assert torch.equal(a(ids).logits, b(ids).logits)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_layer_on_one_gpu_activations_on_another():
    ids = _calib()
    a, b = tiny_llama(), tiny_llama()
    cfg = fptq.method_config("fptq", thresholds=(2.0, 20.0), group_size=32)
    pa = fptq.quantize(a, cfg, ids, device="cuda:0", progress=False)
    pb = fptq.quantize(b, cfg, ids, device="cuda:0", offload="cuda:1", progress=False)
    assert [lp.strategy for lp in pa.layers.values()] == [lp.strategy for lp in pb.layers.values()]


def test_lae_scope_all_equalizes_static_layers_but_not_linear_fed_dynamic_ones():
    model = tiny_llama()
    cfg = fptq.method_config("fptq", thresholds=(2.0, 20.0), group_size=32, lae_scope="all")
    plan = fptq.quantize(model, cfg, _calib(), device="cpu", progress=False)
    assert set(plan.counts()) == {"static_tensor", "lae_static_tensor", "dynamic_token"}
    for name, lp in plan.layers.items():
        linear_fed = name.endswith(("o_proj", "down_proj"))
        if lp.strategy in ("static_tensor", "lae_static_tensor") or not linear_fed:
            assert lp.equalization == "lae", name
        else:
            assert lp.equalization == "none", name
    band = fptq.quantize(tiny_llama(), fptq.method_config("fptq", thresholds=(2.0, 20.0), group_size=32,
                                                          lae_scope="band"),
                         _calib(), device="cpu", progress=False)
    assert all((lp.equalization == "lae") == (lp.strategy == "lae_static_tensor") for lp in band.layers.values())
    with pytest.raises(ValueError, match="lae_scope"):
        fptq.method_config("fptq", lae_scope="everything")


def test_configs_saved_before_lae_scope_existed_read_as_band():
    from fptq.config import QuantConfig

    d = fptq.method_config("fptq").to_dict()
    assert d["lae_scope"] == "all"
    d.pop("lae_scope")
    assert QuantConfig.from_dict(d).lae_scope == "band"


@pytest.mark.parametrize("shape", [(3, 5, 8), (15, 8)])
def test_first_token_weight_and_channel_range_statistics(shape):
    """``hessian_first_token_weight`` counts the first token of every window that many times in the GPTQ
    Hessian (3-D inputs, or 2-D inputs of whole windows); the channel range is max - min over every token."""
    from fptq.calibrate import collect_input_stats

    lin = torch.nn.Linear(8, 4)
    x = torch.randn(*shape)
    with collect_input_stats({"l": lin}, 0, torch.Generator().manual_seed(0), hessian=True, seq_len=5,
                             hessian_first_token_weight=4.0) as stats:
        lin(x)
    flat = x.reshape(-1, 8)
    w = torch.ones(3, 5)
    w[:, 0] = 4.0
    torch.testing.assert_close(stats["l"].hessian.h, 2 / 15 * (flat * w.reshape(-1, 1)).t() @ flat,
                               rtol=1e-5, atol=1e-5)
    assert torch.equal(stats["l"].channel_range(), flat.amax(0) - flat.amin(0))


def test_first_token_weighted_gptq_and_range_equalization_run_end_to_end():
    model = tiny_llama(hidden_size=128, intermediate_size=256)
    ids = _calib(16, 64)
    ref = model(ids).logits
    for overrides in ({"gptq": True, "gptq_first_token_weight": 16.0}, {"equalization_stat": "range"}):
        mm = copy.deepcopy(model)
        cfg = fptq.method_config("fptq", group_size=32, thresholds=(2.0, 20.0), **overrides)
        plan = fptq.quantize(mm, cfg, ids, device="cpu", progress=False)
        assert plan.config[next(iter(overrides))] == next(iter(overrides.values()))
        assert sqnr_db(ref, mm(ids).logits) > 8.0


def test_output_observer_picks_each_static_scale_on_the_quantized_consumers():
    """``static_observer="output"``: a static Linear's scale is scored through the group's quantized
    weights, so on the layer's inputs it leaves an output error no larger (up to sampling) than the
    calibration max or the activation-MSE clip would."""
    from fptq.quant.activations import fake_quantize_static
    from fptq.quant.static_scale import choose_static_scale

    model = tiny_llama()
    ids = _calib()
    ref = model(ids).logits
    x0 = _qkv_input(model, ids)
    # no equalization: layer 0's q/k/v see exactly the captured float inputs
    cfg = fptq.method_config("naive-w4a8", group_size=32, static_observer="output")
    plan = fptq.quantize(model, cfg, ids, device="cpu", progress=False)
    assert all(lp.observer == "output" and lp.act_scale is not None for lp in plan.layers.values())
    assert sqnr_db(ref, model(ids).logits) > 5
    scale = plan.layers["model.layers.0.self_attn.q_proj"].act_scale
    mods = [model.get_submodule(f"model.layers.0.self_attn.{p}_proj") for p in "qkv"]
    w = torch.cat([m.dequantized_weight().float() for m in mods])
    x = x0.reshape(-1, w.shape[1]).float()

    def err(s):
        return float(((fake_quantize_static(x, s) - x) @ w.t()).pow(2).sum())

    absmax = float(x.abs().max())
    others = [choose_static_scale("max", absmax), choose_static_scale("mse", absmax, sample=x)]
    assert err(scale) <= 1.05 * min(err(s) for s in others)


def test_paper_recipe_is_available_by_name():
    cfg = fptq.method_config("fptq-paper")
    assert cfg.lae_scope == "band" and cfg.static_observer == "max" and not cfg.gptq
    model = tiny_llama()
    plan = fptq.quantize(model, fptq.method_config("fptq-paper", thresholds=(2.0, 20.0), group_size=32), _calib(),
                         device="cpu", progress=False)
    eq = [lp for lp in plan.layers.values() if lp.equalization == "lae"]
    assert eq and all(lp.strategy == "lae_static_tensor" for lp in eq)  # LAE only in the band


def test_hessian_from_sampled_rows():
    """``hessian_rows_per_batch``: the Hessian of ``k`` rows of each batch drawn without replacement is
    exactly ``2/n X_s^T X_s`` of those rows (reproducible from the generator); asking for at least the
    batch's rows gives the full Hessian."""
    from fptq.calibrate import collect_input_stats

    lin = torch.nn.Linear(8, 4)
    x = torch.randn(2, 50, 8)

    def hess(k, seed=0):
        with collect_input_stats({"l": lin}, 0, torch.Generator().manual_seed(seed), hessian=True,
                                 hessian_rows_per_batch=k) as stats:
            for b in x:
                lin(b)
        return stats["l"].hessian

    full = hess(0)
    torch.testing.assert_close(full.h, 2 / 100 * x.reshape(-1, 8).t() @ x.reshape(-1, 8), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hess(50).h, full.h)
    sub = hess(20)
    assert sub.n == 40 and torch.equal(sub.h, hess(20).h) and not torch.equal(sub.h, hess(20, seed=1).h)
    g = torch.Generator().manual_seed(0)
    rows = torch.cat([b[torch.randperm(50, generator=g)[:20]] for b in x])
    torch.testing.assert_close(sub.h, 2 / 40 * rows.t() @ rows, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="gptq_hessian_rows"):
        fptq.method_config("fptq", gptq_hessian_rows=-1)


def test_first_token_absmax_and_the_sink_observer():
    """The statistics keep max |x| of the first token of every window per channel, and the ``mse_sink``
    observer's static scales never clip it (after the equalization the layer applies)."""
    from fptq.calibrate import collect_input_stats

    lin = torch.nn.Linear(8, 4)
    x = torch.randn(3, 5, 8)
    with collect_input_stats({"l": lin}, 0, torch.Generator().manual_seed(0)) as stats:
        lin(x)
    torch.testing.assert_close(stats["l"].first_token_absmax, x[:, 0].abs().amax(0))

    model = tiny_llama()
    ids = _calib()
    x0 = _qkv_input(model, ids)
    sink = float(x0[:, 0].abs().max())  # layer 0's q/k/v input at the first position
    for method in ("naive-w4a8", "fptq"):
        mm = copy.deepcopy(model)
        cfg = fptq.method_config(method, thresholds=(2.0, 20.0), group_size=32, static_observer="mse_sink")
        plan = fptq.quantize(mm, cfg, ids, device="cpu", progress=False)
        static = [lp for lp in plan.layers.values() if lp.act_scale is not None]
        assert static and all(lp.observer == "mse_sink" for lp in static)
        if method == "naive-w4a8":  # no equalization: the floor is the captured sink input itself
            assert plan.layers["model.layers.0.self_attn.q_proj"].act_scale * 127 >= sink * (1 - 1e-6)


def test_sampled_hessian_keeps_every_sink_row_and_is_unbiased():
    """``hessian_rows``: the first token of every window is always taken, weighted down to its share,
    so the sampled Hessian is the full one up to a scale in expectation (checked over many draws)."""
    from fptq.calibrate import hessian_rows

    first = (torch.arange(40) % 10 == 0)
    pick, w = hessian_rows(40, 12, first, torch.Generator().manual_seed(0))
    assert len(pick) == 12 and len(set(pick.tolist())) == 12
    assert set(torch.nonzero(first).squeeze(1).tolist()) <= set(pick.tolist())
    torch.testing.assert_close(w[:4], torch.full((4,), 8 / 36))
    assert torch.equal(w[4:], torch.ones(8))
    x = torch.randn(40, 6)
    x[first] *= 30  # sink rows: far larger
    full = x.t() @ x
    g = torch.Generator().manual_seed(1)
    est = torch.zeros(6, 6)
    for _ in range(4000):
        p, ww = hessian_rows(40, 12, first, g)
        est += (x[p] * ww[:, None]).t() @ x[p] * (36 / 8)
    est /= 4000
    assert float((est - full).norm() / full.norm()) < 0.02
    p, ww = hessian_rows(40, 12, None, g)  # windows unknown: plain draw
    assert len(p) == 12 and torch.equal(ww, torch.ones(12))


def test_fast_calibration_choices_match_the_float32_reference_run():
    """The default's execution choices -- the statistics pass in bfloat16 and the next layer's inputs from the
    integer kernels -- pick the same plan as float32 statistics with simulated propagation, the same q/k weights
    bit for bit in the first layer (their inputs, the normed embeddings, stay float32; v_proj takes o_proj's
    equalization, from bfloat16 statistics), and a model as accurate; afterwards every
    QuantLinear is back on the simulated path and the checkpoint round-trips."""
    cfg = fptq.method_config("fptq", group_size=32, thresholds=(2.0, 20.0))
    assert cfg.calib_dtype == "bfloat16" and cfg.propagate_backend == "auto"
    model = tiny_llama()
    ids = _calib(16, 32)
    ref = model(ids).logits
    slow, fast = copy.deepcopy(model), copy.deepcopy(model)
    slow_plan = fptq.quantize(slow, fptq.method_config("fptq", group_size=32, thresholds=(2.0, 20.0),
                                                       calib_dtype="float32", propagate_backend="reference"),
                              ids, device="cpu", progress=False)
    fast_plan = fptq.quantize(fast, cfg, ids, device="cpu", progress=False)
    assert {n: lp.strategy for n, lp in fast_plan.layers.items()} == {
        n: lp.strategy for n, lp in slow_plan.layers.items()}
    first = [n for n, m in fast.named_modules() if isinstance(m, QuantLinear)
             and n.startswith("model.layers.0.self_attn.") and n[-6:] in ("q_proj", "k_proj")]
    assert len(first) == 2
    for n in first:
        a, b = fast.get_submodule(n), slow.get_submodule(n)
        assert torch.equal(a.codes(), b.codes())
        assert a.backend == "reference"
    assert abs(sqnr_db(ref, fast(ids).logits) - sqnr_db(ref, slow(ids).logits)) < 1.0
    with pytest.raises(ValueError, match="calib_dtype"):
        fptq.method_config("fptq", calib_dtype="float16")


def test_execution_choices_fit_the_device():
    """``propagate_backend="auto"`` means the native CPU kernels, where they run; on another device (or a CPU
    without them) the layers propagate on the simulated path; the plan records what ran."""
    from fptq.calibrate import execution_choices
    from fptq.kernels import default_backend

    cfg = fptq.method_config("fptq")
    gpu = execution_choices(cfg, torch.device("cuda"))
    assert gpu.propagate_backend == "reference" and gpu.calib_dtype == "bfloat16"
    cpu = execution_choices(cfg, torch.device("cpu"))
    assert cpu.propagate_backend == ("auto" if default_backend("cpu") == "native" else "reference")
    assert execution_choices(fptq.method_config("rtn-w4a16"), torch.device("cpu")) == fptq.method_config("rtn-w4a16")
    plan = fptq.quantize(tiny_llama(), fptq.method_config("fptq", group_size=32), _calib(), device="cpu",
                         progress=False)
    assert plan.config["propagate_backend"] == cpu.propagate_backend
    assert plan.config["calib_dtype"] == cpu.calib_dtype


def test_weight_only_rtn_is_data_free_and_equals_the_calibrated_path():
    """rtn-w4a16 reads no activations: the data-free path gives the QuantLinears and plan entries that the
    calibrated per-layer path gives (act_absmax aside, which it does not measure), and runs no decoder layer."""
    from fptq.pipeline import quantize_layer, quantize_layer_weights

    cfg = fptq.method_config("rtn-w4a16", group_size=16)
    assert not cfg.needs_calibration
    assert fptq.method_config("gptq-w4a16").needs_calibration and fptq.method_config("fptq").needs_calibration
    assert cfg.replace(weight_clip_search=True, weight_clip_objective="output").needs_calibration
    assert not cfg.replace(weight_clip_search=True).needs_calibration  # the weight-error clip reads no data

    model = tiny_llama()
    adapter = get_adapter(model)
    ids = _calib()
    inputs = capture_layer0_inputs(model, adapter, ids, 4, torch.device("cpu"), torch.device("cpu"))
    calibrated, free = copy.deepcopy(adapter.layers(model)[0]), copy.deepcopy(adapter.layers(model)[0])
    want = quantize_layer(calibrated, "model.layers.0", adapter, cfg, inputs, torch.device("cpu"), (4, 2),
                          torch.Generator().manual_seed(0))
    got = quantize_layer_weights(free, "model.layers.0", adapter, cfg)
    assert set(got) == set(want)
    for k in want:
        a, b = want[k].to_dict(), got[k].to_dict()
        assert a.pop("act_absmax") > 0 and b.pop("act_absmax") is None and math.isnan(got[k].act_absmax)
        assert a == b
    sa, sb = calibrated.state_dict(), free.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)

    # the whole model: no decoder layer runs
    q = copy.deepcopy(model)
    calls = []
    for layer in adapter.layers(q):
        layer.register_forward_hook(lambda *a: calls.append(1))
    plan = fptq.quantize(q, cfg, ids, device="cpu", progress=False)
    assert not calls and plan.counts() == {"float": len(plan.layers)}
    assert all(isinstance(q.get_submodule(n), QuantLinear) for n in plan.layers)


def test_scale_rounding_follows_the_weight_method():
    """"auto" rounds round-to-nearest weights' float16 scales down (never above absmax / 7.5) and GPTQ's to
    nearest; an explicit setting applies to both paths."""
    from fptq.pipeline import quantize_layer, quantize_layer_weights
    from fptq.quant.weights import fp16_floor

    def absmax_scales(w, gs=16):
        return w.float().view(w.shape[0], -1, gs).abs().amax(-1) / 7.5

    model = tiny_llama()
    adapter = get_adapter(model)
    layer0 = adapter.layers(model)[0]
    weights = {n: lin.weight.detach().clone() for n, lin in adapter.quantizable_linears(layer0).items()}
    for rounding, want in (("auto", fp16_floor), ("down", fp16_floor), ("nearest", lambda s: s.half())):
        cfg = fptq.method_config("rtn-w4a16", group_size=16, scale_rounding=rounding)
        layer = copy.deepcopy(layer0)
        quantize_layer_weights(layer, "model.layers.0", adapter, cfg)
        for n, w in weights.items():
            assert torch.equal(layer.get_submodule(n).w_scales, want(absmax_scales(w))), (rounding, n)
    assert any(not torch.equal(fp16_floor(absmax_scales(w)), absmax_scales(w).half()) for w in weights.values())

    # GPTQ: the pipeline passes GPTQ's rounding (nearest under "auto") to gptq_quantize
    ids = _calib()
    inputs = capture_layer0_inputs(model, adapter, ids, 4, torch.device("cpu"), torch.device("cpu"))
    got = {}
    for rounding in ("auto", "nearest", "down"):
        cfg = fptq.method_config("gptq-w4a16", group_size=16, scale_rounding=rounding)
        layer = copy.deepcopy(layer0)
        quantize_layer(layer, "model.layers.0", adapter, cfg, copy.deepcopy(inputs), torch.device("cpu"), (4, 2),
                       torch.Generator().manual_seed(0))  # (it replaces the inputs with the layer's outputs)
        got[rounding] = layer.get_submodule("self_attn.q_proj").w_scales
    assert torch.equal(got["auto"], got["nearest"]) and not torch.equal(got["auto"], got["down"])


def test_naive_w4a8_scales_are_the_mean_of_window_maxima():
    """``naive-w4a8`` takes the ``mean_max`` observer: a static scale is the mean over the calibration
    windows of each window's max |x| (as llm-compressor's moving-average min-max approximates), divided
    by 127; checked on layer 0's q/k/v input, which no earlier quantization touches."""
    model = tiny_llama()
    ids = _calib(6, 16)
    x0 = _qkv_input(model, ids)
    expected = float(x0.abs().amax(dim=(1, 2)).mean()) / 127
    cfg = fptq.method_config("naive-w4a8", group_size=32)
    assert cfg.static_observer == "mean_max"
    plan = fptq.quantize(copy.deepcopy(model), cfg, ids, device="cpu", progress=False)
    lp = plan.layers["model.layers.0.self_attn.q_proj"]
    assert lp.observer == "mean_max"
    assert lp.act_scale == pytest.approx(expected, rel=1e-5)
    assert expected * 127 < float(x0.abs().max())  # below the max: the windows' maxima differ


def _layer1_qkv_absmax(model, ids):
    """max |x| of what layer 1's q_proj receives for ``ids`` (a float model or a quantized one)."""
    return float(_qkv_input(model, ids, layer=1).abs().max())


@pytest.mark.parametrize("method", ["lae-dynamic-w4a8", "fptq"])
def test_calib_inputs_float_calibrates_every_layer_on_the_float_model(method):
    """``calib_inputs="float"`` (llm-compressor's round-to-nearest recipes): layer 1 is calibrated on the
    float model's activations, so its recorded max |x| is the float model's, to float rounding (for ``fptq``
    through its bfloat16 statistics pass, to bfloat16's); by default it is the quantized model's, which
    differs. Both give a working model, and the float-input run leaves the plan's layout unchanged."""
    model = tiny_llama()
    ids = _calib()
    float_max = _layer1_qkv_absmax(model, ids)
    plans, models = {}, {}
    for inputs in ("quantized", "float"):
        # the residual stream left in its order and unrotated: layer 0 of the quantized model is spliced into the
        # float one below
        cfg = fptq.method_config(method, group_size=32, calib_inputs=inputs, residual_order="none", rotation="none")
        models[inputs] = copy.deepcopy(model)
        plans[inputs] = fptq.quantize(models[inputs], cfg, ids, device="cpu", progress=False)
    rel = 1e-5 if method == "lae-dynamic-w4a8" else 1e-2
    name = "model.layers.1.self_attn.q_proj"
    assert plans["float"].layers[name].act_absmax == pytest.approx(float_max, rel=rel)
    # the default's layer 1 sees layer 0's quantization: its statistics are those of the quantized model
    quant_layer0 = copy.deepcopy(model)
    quant_layer0.model.layers[0] = models["quantized"].model.layers[0]
    assert plans["quantized"].layers[name].act_absmax == pytest.approx(_layer1_qkv_absmax(quant_layer0, ids), rel=rel)
    # and that differs from the float model's by more than the float-input run's rounding
    assert (abs(plans["quantized"].layers[name].act_absmax - float_max)
            > 3 * abs(plans["float"].layers[name].act_absmax - float_max))
    assert plans["float"].layers.keys() == plans["quantized"].layers.keys()
    ref = model(ids).logits
    for m in models.values():
        assert sqnr_db(ref, m(ids).logits) > 10


def test_calib_inputs_is_validated():
    with pytest.raises(ValueError, match="calib_inputs must be 'quantized' or 'float'"):
        fptq.method_config("fptq", calib_inputs="fp32")


def test_float16_model_whose_hidden_states_sum_past_float16s_range_quantizes():
    """Issue 28: float16 checkpoints stopped at layer 0 with "non-finite values" on a GPU. The finiteness check
    summed a layer's outputs in float16, which overflows to Inf once the batch's values add up past 65504
    (one large channel over a few thousand tokens does), though every value is finite. Reproduced here on
    the CPU: a residual channel of 700 over 4 x 32 tokens sums to 89600."""
    from fptq.calibrate import LayerInputs, run_layer

    h = torch.zeros(4, 32, 64, dtype=torch.float16)
    h[..., 0] = 700.0
    inputs = LayerInputs(hidden=[h], kwargs=[{}])
    out = run_layer(torch.nn.Identity(), inputs, torch.device("cpu"))
    assert torch.equal(out[0], h)
    with pytest.raises(fptq.FptqError, match="non-finite"):
        run_layer(torch.nn.Identity(), LayerInputs(hidden=[h.clone().fill_(float("inf"))], kwargs=[{}]),
                  torch.device("cpu"))
    model = tiny_llama(outliers=False).to(torch.float16)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 700.0
    ids = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    plan = fptq.quantize(model, fptq.method_config("fptq", group_size=32), ids, device="cpu", progress=False)
    assert len(plan.layers) == 14


def test_input_stats_sample_first_rows_without_the_whole_concatenation():
    """``InputStats.sample(max_rows)``: the first rows of ``sample()``, whatever batches they span."""
    from fptq.calibrate import InputStats

    st = InputStats(in_features=3, samples=[torch.arange(i, i + n * 3, dtype=torch.bfloat16).view(n, 3)
                                            for i, n in ((0, 5), (100, 7), (200, 1), (300, 6))])
    whole = st.sample()
    assert whole.dtype == torch.float32 and whole.shape == (19, 3)
    for m in (1, 4, 5, 6, 12, 13, 19, 50):
        assert torch.equal(st.sample(m), whole[:m])
    assert InputStats(in_features=3).sample(4).shape == (0, 3)


def test_a_pass_run_for_its_hooks_keeps_no_outputs():
    """The statistics pass runs each layer for its hooks alone (``keep=False``): no batch's output outlives its
    finiteness check (kept, they were one more copy of every calibration token's hidden state until the pass
    ended: +144 MB on the README quickstart), and the check still runs."""
    import weakref

    from fptq.calibrate import LayerInputs, run_layer

    seen, alive = [], []

    class Probe(torch.nn.Module):
        def forward(self, x):
            alive.append(sum(r() is not None for r in seen))  # earlier batches' outputs still held
            out = x * 2
            seen.append(weakref.ref(out))
            return out

    hidden = [torch.randn(2, 8, 16) for _ in range(3)]
    inputs = LayerInputs(hidden=list(hidden), kwargs=[{}] * 3)
    assert run_layer(Probe(), inputs, torch.device("cpu"), keep=False) is None
    assert alive == [0, 0, 0] and all(r() is None for r in seen)  # each output freed before the next batch
    assert all(a is b for a, b in zip(inputs.hidden, hidden))  # the inputs are left as they were
    kept = run_layer(Probe(), inputs, torch.device("cpu"))
    assert [torch.equal(k, 2 * h) for k, h in zip(kept, hidden)] == [True] * 3
    bad = LayerInputs(hidden=[torch.full((2, 8, 16), float("nan"))], kwargs=[{}])
    with pytest.raises(fptq.FptqError, match="non-finite"):
        run_layer(Probe(), bad, torch.device("cpu"), keep=False)
