import json
import math

import pytest

from fptq import QuantConfig, method_config
from fptq.config import Strategy
from fptq.plan import LayerPlan, Plan, choose_strategy


@pytest.mark.parametrize("v,expected", [
    (0.0, Strategy.STATIC), (14.999, Strategy.STATIC), (15.0, Strategy.LAE_STATIC),
    (149.99, Strategy.LAE_STATIC), (150.0, Strategy.DYNAMIC), (3082.0, Strategy.DYNAMIC),
])
def test_strategy_at_thresholds(v, expected):
    assert choose_strategy(v, (15.0, 150.0)) == expected


def test_custom_thresholds():
    assert choose_strategy(5.0, (4.0, 6.0)) == Strategy.LAE_STATIC
    assert choose_strategy(6.0, (4.0, 6.0)) == Strategy.DYNAMIC


def test_plan_json_round_trip(tmp_path):
    plan = Plan(thresholds=(15.0, 150.0), config=method_config("fptq").to_dict())
    plan.layers["model.layers.0.mlp.down_proj"] = LayerPlan(strategy="dynamic_token", act_absmax=3082.5,
                                                            in_features=1536, out_features=576)
    plan.layers["model.layers.0.self_attn.q_proj"] = LayerPlan(strategy="static_tensor", act_absmax=3.0,
                                                               act_scale=3.0 / 127)
    plan.save(tmp_path / "p.json")
    back = Plan.load(tmp_path / "p.json")
    assert back.to_dict() == plan.to_dict()
    d = plan.to_dict()
    assert d["version"] == 1 and d["thresholds"] == [15.0, 150.0]
    assert d["layers"]["model.layers.0.mlp.down_proj"]["strategy"] == "dynamic_token"
    assert back.quant_config() == method_config("fptq")


def test_unmeasured_input_is_json_null(tmp_path):
    """A layer whose input was not measured (data-free RTN, float layers) has NaN act_absmax in memory and a
    strict-JSON null on disk (no bare NaN token), and reads back as NaN."""
    plan = Plan(thresholds=(15.0, 150.0), config=method_config("rtn-w4a16").to_dict())
    plan.layers["model.layers.0.mlp.up_proj"] = LayerPlan(strategy="float", act_absmax=float("nan"), abits=16)
    plan.save(tmp_path / "p.json")

    def no_nan(token):
        raise AssertionError(f"non-standard JSON constant {token}")

    raw = json.loads((tmp_path / "p.json").read_text(), parse_constant=no_nan)
    assert raw["layers"]["model.layers.0.mlp.up_proj"]["act_absmax"] is None
    back = Plan.load(tmp_path / "p.json")
    assert math.isnan(back.layers["model.layers.0.mlp.up_proj"].act_absmax)


def test_config_round_trip_and_validation():
    cfg = method_config("fptq", group_size=64, thresholds=(10, 100), gptq=True)
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="--group-size"):
        QuantConfig(group_size=3)
    with pytest.raises(ValueError, match="--thresholds"):
        QuantConfig(thresholds=(100, 10))
    with pytest.raises(ValueError, match="--wbits"):
        QuantConfig(wbits=5)
    with pytest.raises(ValueError, match="newer"):
        QuantConfig.from_dict({"version": 99})
    with pytest.raises(ValueError, match="unknown method"):
        method_config("awq")
    with pytest.raises(ValueError, match="scale_rounding"):
        QuantConfig(scale_rounding="up")
    # float16 weight scales: "auto" rounds round-to-nearest weights' scales down and GPTQ's to nearest;
    # a configuration saved before the field existed ran "nearest" everywhere
    assert cfg.scale_rounding == "auto"
    assert (cfg.rounding_for(gptq=False), cfg.rounding_for(gptq=True)) == ("down", "nearest")
    assert cfg.replace(scale_rounding="down").rounding_for(gptq=True) == "down"
    old = {k: v for k, v in cfg.to_dict().items() if k != "scale_rounding"}
    assert QuantConfig.from_dict(old).scale_rounding == "nearest"
    assert QuantConfig.from_dict(old).rounding_for(gptq=False) == "nearest"
