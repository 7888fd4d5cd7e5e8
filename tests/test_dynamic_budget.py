"""The budget of dynamic Linears (fptq.dynamic_budget) and how the pipeline spends it."""
import pytest
import torch

import fptq
from fptq.dynamic_budget import DynamicCandidate, choose_dynamic, dynamic_allowance, dynamic_budget
from fptq.nn import QuantLinear

from .conftest import sqnr_db, tiny_llama


def test_budget_is_the_floor_of_the_share():
    assert dynamic_budget(0.1, 168) == 16
    assert dynamic_budget(0.1, 210) == 21
    assert dynamic_budget(0.0, 168) == 0
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            dynamic_budget(bad, 10)


def test_allowance_reserves_the_predicted_thresholds_linears_and_spreads_the_rest():
    budget, predicted = 16, [0, 0, 1, 3, 0, 1] + [0] * 15 + [1, 1, 1]  # Qwen2.5-Coder-0.5B's float pass
    used = extras = 0
    spent = []
    for i in range(24):  # every layer spends all it may; the thresholds take what was predicted
        a = dynamic_allowance(budget, i, predicted, used, extras)
        assert a >= predicted[i]
        used += a
        extras += a - predicted[i]
        spent.append(extras)
    assert used == budget  # the 8 predicted ones fit: the last layers' were reserved
    assert spent == [8 * (i + 1) // 24 for i in range(24)]  # the other 8 spread evenly
    # a layer that spent nothing leaves its part to the next one
    assert dynamic_allowance(16, 5, predicted, used=4, extras=0) == 1 + 2
    # the thresholds took more than predicted: the extras shrink so that the later predicted ones still fit
    assert dynamic_allowance(16, 20, predicted, used=13, extras=6) == 0
    assert dynamic_allowance(16, 21, predicted, used=16, extras=6) == 1  # never below the thresholds' own
    with pytest.raises(ValueError, match="layer index"):
        dynamic_allowance(16, 24, predicted, 0, 0)


def test_choose_dynamic_takes_the_largest_drop_per_linear_that_fits():
    cands = [DynamicCandidate(0, 3, 0.30, 0.24),  # 0.02 per Linear
             DynamicCandidate(1, 1, 0.10, 0.07),  # 0.03
             DynamicCandidate(2, 2, 0.20, 0.18),  # 0.01
             DynamicCandidate(3, 1, 0.05, 0.06)]  # the error would rise
    assert choose_dynamic(cands, 0) == []
    assert choose_dynamic(cands, 1) == [1]
    assert choose_dynamic(cands, 2) == [1]  # q/k/v does not fit in what is left; gate/up's drop is smaller
    assert choose_dynamic(cands, 3) == [1, 2]
    assert choose_dynamic(cands, 4) == [1, 0]
    assert choose_dynamic(cands, 100) == [1, 0, 2]  # never one whose error rises
    assert choose_dynamic(cands, -2) == []


def _calib(n=8, s=32, vocab=300, seed=0):
    return torch.randint(0, vocab, (n, s), generator=torch.Generator().manual_seed(seed))


def _quantized(share, thresholds=(15.0, 150.0), layers=4, rotation="residual"):
    model = tiny_llama(num_hidden_layers=layers)  # large channels in the norms' outputs: static costs accuracy
    cfg = fptq.method_config("fptq", group_size=32, thresholds=thresholds, dynamic_share=share, rotation=rotation)
    plan = fptq.quantize(model, cfg, _calib(), device="cpu", progress=False)
    return model, plan


def test_pipeline_spends_the_budget_on_groups_whose_error_drops_and_keeps_the_static_share():
    ids = _calib(4, 32, seed=3)
    ref = tiny_llama(num_hidden_layers=4)(ids).logits
    # unrotated: the rotation spreads the planted outliers, which leaves the budget little to gain on this model
    base_model, base = _quantized(0.0, rotation="none")
    model, plan = _quantized(0.3, rotation="none")
    total = len(plan.layers)
    assert total == 4 * 7
    assert "dynamic_token" not in base.counts()  # the thresholds alone: every Linear static here
    dyn = [k for k, e in plan.layers.items() if e.strategy == "dynamic_token"]
    assert 0 < len(dyn) <= int(0.3 * total)
    for k in dyn:  # each says why, and runs as it says
        assert "dynamic_share" in plan.layers[k].equalization_note
        assert model.get_submodule(k).act_mode == "dynamic_token" and plan.layers[k].act_scale is None
    # the layers spend evenly: the first i + 1 layers hold at most (i + 1) / 4 of the budget
    per_layer = [sum(k.startswith(f"model.layers.{i}.") for k in dyn) for i in range(4)]
    assert all(sum(per_layer[:i + 1]) <= 8 * (i + 1) // 4 for i in range(4)), per_layer
    # spending the budget lowers the output error of the model (by 2.2 dB when written)
    assert sqnr_db(ref, model(ids).logits) > sqnr_db(ref, base_model(ids).logits) + 1.0


def test_thresholds_dynamic_linears_count_against_the_budget():
    # unrotated: the planted outlier channels put more Linears over the thresholds than a 10% budget holds
    _, forced = _quantized(0.0, thresholds=(2.0, 20.0), rotation="none")
    n_forced = forced.counts().get("dynamic_token", 0)
    assert n_forced > int(0.1 * len(forced.layers))  # more than a 10% budget: nothing is added
    _, plan = _quantized(0.1, thresholds=(2.0, 20.0), rotation="none")
    assert plan.counts() == forced.counts()
    assert not any("dynamic_share" in (e.equalization_note or "") for e in plan.layers.values())


def test_dynamic_share_is_validated_and_reaches_the_cli():
    with pytest.raises(ValueError, match="dynamic_share"):
        fptq.method_config("fptq", dynamic_share=1.0)
    from fptq.cli import build_parser, config_from_args

    args = build_parser().parse_args(["quantize", "m", "-o", "out", "--dynamic-share", "0.1"])
    assert config_from_args(args).dynamic_share == 0.1


def test_summary_says_how_the_budget_was_spent():
    from fptq.report import quantize_summary

    _, plan = _quantized(0.3)
    dyn = sum(e.strategy == "dynamic_token" for e in plan.layers.values())
    chosen = sum(e.chosen_dynamic for e in plan.layers.values())
    assert chosen == dyn > 0  # nothing reaches the thresholds' 150 here: every dynamic Linear was chosen
    weighed = [e for e in plan.layers.values() if e.static_error is not None]
    assert all(e.dynamic_error is not None for e in weighed) and len(weighed) == len(plan.layers)
    line = f"dynamic    {dyn} of 28 Linears ({100 * dyn / 28:.1f}%, budget 30%): 0 by the thresholds, {chosen} by calibration error"
    assert line in quantize_summary(plan, {}).splitlines()
    _, paper = _quantized(0.0)
    assert "budget" not in quantize_summary(paper, {})


def test_resuming_without_the_prediction_is_refused():
    from fptq.errors import FptqError

    cfg = fptq.method_config("fptq", group_size=32)
    with pytest.raises(FptqError, match="needs the prediction it made"):
        fptq.quantize(tiny_llama(), cfg, _calib(), device="cpu", progress=False, start_layer=1)
