"""The full-attention layer's math, once (docs/design.md, `full_attention`): causal softmax attention of query rows
at given positions over a linear key sequence, block scores, block selection.

One function, `attend_rows` / `full_rows`, serves every form of the op: prefill (row t at position t, keys
0..T-1), decode (one row at `cache_len - 1` over a cache), extend (rows at `start + r` over a cache), and each query
chunk of the reference backend (rows t0..t1-1 over keys 0..t1-1). Logits may be soft-capped (`softcap`) and each
head may have a sink logit in its denominator (`sinks`, gpt-oss); the block scores are the probabilities the layer
computes, sink included: `S[t, j] = max_{i in block j, i <= t} exp(s_ti) / (sum_{i <= t} exp(s_ti) + exp(sink))`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..params import FullParams
from .common import NEG_INF, block_max, compute_dtype, logits, positions, select_blocks, sink_logits, weighted_sum


def attend_rows(q: Tensor, k: Tensor, v: Tensor, query_pos: Tensor, sinks: Tensor | None, p: FullParams):
    """Causal attention of query rows at `query_pos` over keys 0..S-1 (in the dtype of the inputs: cast first).

    q [B, Hq, R, d], k/v [B, Hkv, S, d], query_pos int [B | 1, R], sinks [Hq] or None
    -> out [B, Hq, R, d], lse of the keys alone [B, Hkv, G, R, 1], the masked logits [B, Hkv, G, R, S] and the
    log-denominator [B, Hkv, G, R, 1] (lse, with the sink added when there is one). Differentiable.
    """
    B, Hq, R, d = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    s = logits(q, k, p.scale, p.softcap)  # [B, Hkv, G, R, S]
    future = torch.arange(S, device=q.device).view(1, 1, S) > positions(query_pos, R).unsqueeze(-1)  # [B|1, R, S]
    s = s.masked_fill(future.unsqueeze(1).unsqueeze(1), NEG_INF)
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    sink = sink_logits(sinks, Hkv, s.dtype)
    den = lse if sink is None else torch.logaddexp(lse, sink.reshape(1, Hkv, Hq // Hkv, 1, 1))
    return weighted_sum(torch.exp(s - den), v), lse, s, den


def full_rows(q: Tensor, k: Tensor, v: Tensor, query_pos: Tensor, sinks: Tensor | None, p: FullParams,
              return_scores: bool = False):
    """Full layer for query rows at `query_pos` (any float dtype: computed in `compute_dtype`).

    -> out [B, Hq, R, d] (compute dtype), indices int32 [B, Hkv, R, nsel], lse float32 [B, Hq, R] (keys alone,
    sinks excluded), scores float32 [B, Hq, R, ceil(S / block_size)] (per-head block scores; empty unless
    return_scores).
    """
    B, Hq, R, d = q.shape
    S = k.shape[2]
    ct = compute_dtype(q.dtype)
    out, lse, s, den = attend_rows(q.to(ct), k.to(ct), v.to(ct), query_pos, sinks, p)
    scores = torch.exp(block_max(s, p.block_size) - den)  # [B, Hkv, G, R, nb + 1]; 0 for future blocks
    indices = select_blocks(scores.amax(dim=2), p.block_size, p.nsel, query_pos)
    nb = (S + p.block_size - 1) // p.block_size
    per_head = (scores[..., :nb].reshape(B, Hq, R, nb).float() if return_scores
                else torch.empty(0, dtype=torch.float32, device=q.device))
    return out, indices, lse.reshape(B, Hq, R).float(), per_head


def full_attention(q: Tensor, k: Tensor, v: Tensor, sinks: Tensor | None, p: FullParams, return_scores: bool = False):
    """Prefill: row t at position t over keys 0..T-1. q [B, Hq, T, d], k/v [B, Hkv, T, d] -> out [B, Hq, T, d]
    (q's dtype), indices int32 [B, Hkv, T, nsel], lse float32 [B, Hq, T], scores (see `full_rows`)."""
    out, indices, lse, scores = full_rows(q, k, v, torch.arange(q.shape[2], device=q.device), sinks, p, return_scores)
    return out.to(q.dtype), indices, lse, scores


def full_attention_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_len: Tensor, sinks: Tensor | None,
                          p: FullParams):
    """One new token per row at position `cache_len - 1` (the caches hold it; later slots are ignored).
    q [B, Hq, 1, d], k_cache/v_cache [B, Hkv, S, d], cache_len int [B] -> out [B, Hq, 1, d], indices [B, Hkv, 1, nsel]
    """
    pos = cache_len.long().reshape(-1, 1) - 1
    out, indices, _, _ = full_rows(q, k_cache, v_cache, pos, sinks, p)
    return out.to(q.dtype), indices


def extend_positions(start: Tensor, R: int) -> Tensor:
    """int64 [B, R]: positions start[b] .. start[b] + R - 1 of R new tokens per row."""
    return start.long().reshape(-1, 1) + torch.arange(R, device=start.device).view(1, R)


def full_attention_extend(q: Tensor, k_cache: Tensor, v_cache: Tensor, start: Tensor, sinks: Tensor | None,
                          p: FullParams):
    """R new tokens per row at positions `start[b] + r`, already written in the caches (chunked prefill,
    speculative verification). q [B, Hq, R, d] -> out [B, Hq, R, d], indices int32 [B, Hkv, R, nsel]."""
    out, indices, _, _ = full_rows(q, k_cache, v_cache, extend_positions(start, q.shape[2]), sinks, p)
    return out.to(q.dtype), indices


__all__ = ["attend_rows", "full_rows", "full_attention", "full_attention_decode", "full_attention_extend",
           "extend_positions"]
