"""How the runtime splits a long prompt: into chunks of equal length, each of :data:`PREFILL_CHUNK_ROWS` rows
(tokens times sequences) or more (up to twice as many), run one after the other through every layer, each
continuing the KV cache the ones before wrote.

A chunk's activations, products and caches stay nearer the cores, where a whole long prompt's do not: on 2
threads of the AMX Xeon (``bench/prefill_chunks.py``) SmolLM2's 2048-token prompt took 588 -> 540 ms in chunks of
512 rows, 16 prompts of 256 tokens 1063 -> 926 ms, Qwen2.5-Coder-0.5B's 2048 tokens 1013 -> 984 ms; chunks of 256
rows were slower than none (604 ms for SmolLM2's 2048 tokens), 1024 rows about as fast as 512, and a short last
chunk cost more than it gained (600 tokens as 512 + 88: 0.91x whole), hence equal chunks and none below twice
the rows. The logits are the same bits: every Linear and norm treats each row on its own, and the attention
reads the same cached keys and values in the same order. The runtime's buffers are sized by the chunk, not the
prompt.
"""
from __future__ import annotations

__all__ = ["MIN_CHUNK_TOKENS", "PREFILL_CHUNK_ROWS", "prefill_spans"]

PREFILL_CHUNK_ROWS = 512  # rows (tokens x sequences) per chunk of a prompt
MIN_CHUNK_TOKENS = 64  # tokens per sequence in a chunk, at least (fewer were slower: see above)


def prefill_spans(batch: int, tokens: int, rows: int = PREFILL_CHUNK_ROWS) -> list[tuple[int, int]]:
    """The ``(start, end)`` token ranges a prompt of ``batch`` sequences of ``tokens`` runs in: as many chunks
    of equal length (within a token) as hold ``rows // batch`` tokens each (at least :data:`MIN_CHUNK_TOKENS`),
    so between ``rows`` and twice as many rows (more where the token floor applies); the whole prompt in one
    where ``rows`` is 0 or fewer than two chunks fit (no short last chunk: 600 tokens as 512 + 88 ran 0.91x
    whole)."""
    if batch < 1 or tokens < 1 or rows < 0:
        raise ValueError(f"prefill_spans: batch {batch}, tokens {tokens}, rows {rows}")
    n = 1 if rows == 0 else max(tokens // max(rows // batch, MIN_CHUNK_TOKENS), 1)
    return [(tokens * i // n, tokens * (i + 1) // n) for i in range(n)]
