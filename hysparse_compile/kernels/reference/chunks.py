"""Query chunks of the reference backend: at most `2**25` logits (128 MiB in float32) exist at once.

`query_chunk_elems(n)` forces smaller chunks, so tests run the chunk-offset code at small T.
"""
from __future__ import annotations

import contextlib

_CHUNK_ELEMS = [1 << 25]  # logits per chunk; read at call time, see `query_chunk_elems`


@contextlib.contextmanager
def query_chunk_elems(n: int):
    """Within the block, every query chunk of the reference ops (prefill forward and backward, extend) holds at
    most `n` logits (at least one query row per chunk). Tests force small chunks so the chunk-offset code runs at
    small T (by default a chunk holds 2**25 logits: one chunk up to T ~ 1k at 32 heads). Not thread-safe; for tests
    and debugging.

    >>> with query_chunk_elems(1):  # one query row per chunk
    ...     list(query_chunks(1, 1, 3))
    [(0, 1), (1, 2), (2, 3)]
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"query_chunk_elems takes a positive int (logits per chunk), got {n!r}")
    old, _CHUNK_ELEMS[0] = _CHUNK_ELEMS[0], n
    try:
        yield
    finally:
        _CHUNK_ELEMS[0] = old


def query_chunks(B: int, Hq: int, R: int, keys: int | None = None):
    """Yield (r0, r1) query ranges small enough that [B, Hq, r1 - r0, keys] logits fit the chunk budget
    (keys defaults to R: a prefill, whose last chunk reads every key)."""
    keys = R if keys is None else keys
    step = max(1, min(R, _CHUNK_ELEMS[0] // max(1, B * Hq * keys)))
    for r0 in range(0, R, step):
        yield r0, min(R, r0 + step)
