from .qlinear import ACT_MODES, QuantLinear, set_act_mode

__all__ = ["QuantLinear", "ACT_MODES", "set_act_mode"]
