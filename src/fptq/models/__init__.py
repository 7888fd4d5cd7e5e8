from .adapters import ADAPTERS, Adapter, FoldGroup, attention_heads, get_adapter, supported_architectures

__all__ = ["ADAPTERS", "Adapter", "FoldGroup", "attention_heads", "get_adapter", "supported_architectures"]
