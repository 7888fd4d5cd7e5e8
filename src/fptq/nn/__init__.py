from .qlinear import ACT_MODES, QuantLinear

__all__ = ["QuantLinear", "ACT_MODES"]
