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
                           float32_cache: bool = False, native_amx: bool = False) -> str:
    """The prompt attention for ``choice`` on this CPU: ``"native"`` (fptq's kernel: on AMX-BF16 tiles where
    ``native_amx``, else a flash-attention kernel with AVX512-BF16 dot products), ``"sdpa_bf16"`` (PyTorch's
    scaled_dot_product_attention on bfloat16 queries, keys and values: oneDNN's AMX tiles where the CPU has
    AMX-BF16) or ``"sdpa"`` (the same in float32).

    ``native_amx``: the native kernel runs on AMX tiles for this cache (the ``avx512_amx`` build on a CPU with
    AMX-BF16, a bfloat16 KV cache); then it takes a head size that is a multiple of 32 up to 256, else 64 or 128
    (and needs AVX512-BF16).

    ``"auto"``: ``native`` where it runs on AMX tiles (per layer 2.0-2.4x PyTorch's bf16 SDPA on SmolLM2's and
    Qwen2.5's shapes, 1.6-1.9x on LLaMA-2-7B's: bench/prefill_attention.py), else ``sdpa_bf16`` where the CPU
    has AMX-BF16 and the KV cache is not float32 (a float32 cache asks for float32 attention), else ``native``
    where it runs, else ``sdpa``. A choice that cannot run here falls back the same way (``native`` that cannot
    run runs ``sdpa``)."""
    check_prefill_attention(choice)
    amx_ok = native_amx and head_dim % 32 == 0 and head_dim <= 256
    native_ok = amx_ok or (native_bf16 and head_dim in (64, 128))
    if choice == "auto":
        if amx_ok:
            return "native"
        return "sdpa_bf16" if amx_bf16 and not float32_cache else ("native" if native_ok else "sdpa")
    if choice == "native" and not native_ok:
        return "sdpa"
    return choice
