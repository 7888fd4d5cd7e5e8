from .adapters import (
    ADAPTERS,
    Adapter,
    FoldGroup,
    ResidualStream,
    attention_heads,
    get_adapter,
    llama_shape_problem,
    supported_architectures,
)

__all__ = ["ADAPTERS", "Adapter", "FoldGroup", "ResidualStream", "attention_heads", "get_adapter", "llama_shape_problem",
           "supported_architectures"]
