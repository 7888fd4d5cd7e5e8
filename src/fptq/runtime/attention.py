"""Which attention a prompt (more than one new token per sequence) runs on in :class:`fptq.runtime.Engine`."""
from __future__ import annotations

from ..errors import FptqError

__all__ = ["PREFILL_ATTENTION", "check_prefill_attention", "prefill_attention_path"]

PREFILL_ATTENTION = ("auto", "native", "sdpa_bf16", "sdpa")


def check_prefill_attention(choice: str) -> str:
    """``choice`` if it is one of :data:`PREFILL_ATTENTION`, else an error naming them."""
    if choice not in PREFILL_ATTENTION:
        raise FptqError(f"prefill_attention={choice!r} is not a choice: {', '.join(PREFILL_ATTENTION)}")
    return choice


def prefill_attention_path(choice: str, native_bf16: bool, head_dim: int, amx_bf16: bool,
                           float32_cache: bool = False) -> str:
    """The prompt attention for ``choice`` on this CPU: ``"native"`` (fptq's flash-attention kernel, bfloat16 dot
    products; needs AVX512-BF16 and a head size of 64 or 128), ``"sdpa_bf16"`` (PyTorch's
    scaled_dot_product_attention on bfloat16 queries, keys and values: oneDNN's AMX tiles where the CPU has
    AMX-BF16, about 3x the native kernel there) or ``"sdpa"`` (the same in float32).

    ``"auto"``: ``sdpa_bf16`` where the CPU has AMX-BF16 and the KV cache is not float32 (a float32 cache asks
    for float32 attention), else ``native`` where it runs, else ``sdpa``. A choice that cannot run here falls
    back the same way (``native`` without AVX512-BF16 runs ``sdpa``)."""
    check_prefill_attention(choice)
    native_ok = native_bf16 and head_dim in (64, 128)
    if choice == "auto":
        return "sdpa_bf16" if amx_bf16 and not float32_cache else ("native" if native_ok else "sdpa")
    if choice == "native" and not native_ok:
        return "sdpa"
    return choice
