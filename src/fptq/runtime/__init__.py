"""fptq's runtime: fast prefill and decoding of quantized (and float) LLaMA-shaped models on the CPU."""
from .engine import Engine, EngineLM, KVCache, engine_unsupported_reason
from .loading import load_for_runtime
from .linear import linear_group

__all__ = ["Engine", "EngineLM", "KVCache", "engine_unsupported_reason", "linear_group", "load_for_runtime"]
