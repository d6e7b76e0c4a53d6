"""Several new tokens per row against a non-empty cache (chunked prefill, speculative verification): the extend ops
(`hysparse::full_attention_extend` / `sparse_attention_extend`, kernels/ops.py) for queries at positions
`start[b] + r`, dispatched to a backend like every op (the reference's chunked naive math on any device, Flex on
CUDA; docs/runtime.md). One new token per row goes through the decode ops instead; a prefill of an empty cache goes
through the prefill ops.

Shapes: q [B, Hq, R, d]; caches [B, Hkv, S, d]; start int [B] (tokens cached before the call, so row b's new
tokens sit at positions start[b] .. start[b] + R - 1 and are already written where the layer reads them).
"""
from __future__ import annotations

from torch import Tensor

from .. import functional


def sdpa_layout(x: Tensor) -> Tensor:
    """[B, H, R, d] laid out as SDPA returns it ([B, R, H, d] in memory): graphs captured from SDPA models view
    `out.transpose(1, 2)` without a copy."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def full_attention_extend(q: Tensor, k_cache: Tensor, v_cache: Tensor, start: Tensor, block_size: int, topk: int,
                          scale: float, *, sinks: Tensor | None = None, softcap: float | None = None,
                          backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Causal attention of R new queries over the cache, block scores and selection (as prefill rows would give).

    -> out [B, Hq, R, d], indices int32 [B, Hkv, R, topk // block_size]
    """
    out, indices = functional.full_attention_extend(q, k_cache, v_cache, start, block_size=block_size, topk=topk,
                                                    scale=scale, sinks=sinks, softcap=softcap, backend=backend)
    return sdpa_layout(out), indices


def sparse_attention_extend(q: Tensor, k_shared: Tensor, v_shared: Tensor, indices: Tensor, k_win: Tensor,
                            v_win: Tensor, win_pos: Tensor, start: Tensor, *, block_size: int, window: int | None,
                            gate_sparse, gate_swa, sinks, scale: float, merge: bool, softcap: float | None = None,
                            backend: str = "auto") -> Tensor:
    """The sparse layer for R new queries (see `functional.sparse_attention_extend`). -> out [B, Hq, R, d]"""
    out = functional.sparse_attention_extend(q, k_shared, v_shared, indices, k_win, v_win, win_pos, start,
                                             block_size=block_size, window=window, gate_sparse=gate_sparse,
                                             gate_swa=gate_swa, sinks=sinks, scale=scale, merge=merge,
                                             softcap=softcap, backend=backend)
    return sdpa_layout(out)
