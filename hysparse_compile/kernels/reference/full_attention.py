"""Reference full-attention layer: the naive math (`kernels/naive/full_attention.py`) run in query chunks so that no
more than [B, Hq, chunk, T] logits exist at once; the backward differentiates the same math with autograd, chunk
by chunk (no T x T tensor is kept). Any device.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import naive
from ..params import FullParams
from .chunks import query_chunks


def full_attention_fwd(q: Tensor, k: Tensor, v: Tensor, block_size: int, topk: int, scale: float,
                       return_scores: bool, *, sinks: Tensor | None = None, softcap: float = 0.0):
    """q [B, Hq, T, d], k/v [B, Hkv, T, d] -> out [B, Hq, T, d], indices int32 [B, Hkv, T, nsel],
    lse float32 [B, Hq, T] (sinks excluded), scores float32 [B, Hq, T, nb] (empty unless return_scores)."""
    p = FullParams(block_size, topk, scale, softcap)
    B, Hq, T, d = q.shape
    nb = -(-T // block_size)
    out = torch.empty_like(q)
    lse = torch.empty(B, Hq, T, dtype=torch.float32, device=q.device)
    indices = torch.empty(B, k.shape[1], T, p.nsel, dtype=torch.int32, device=q.device)
    scores = torch.zeros(B, Hq, T, nb, dtype=torch.float32, device=q.device) if return_scores else None
    with torch.no_grad():
        for t0, t1 in query_chunks(B, Hq, T):
            o, idx, l, s = naive.full_rows(q[:, :, t0:t1], k[:, :, :t1], v[:, :, :t1],
                                           torch.arange(t0, t1, device=q.device), sinks, p, return_scores)
            out[:, :, t0:t1], indices[:, :, t0:t1], lse[:, :, t0:t1] = o.to(q.dtype), idx, l
            if scores is not None:
                scores[:, :, t0:t1, : s.shape[-1]] = s
    return out, indices, lse, scores if scores is not None else q.new_empty(0, dtype=torch.float32)


def full_attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float, *,
                       sinks: Tensor | None = None, softcap: float = 0.0):
    """Gradients of the attention output (selection is not differentiated; sinks are constants here: the op
    computes their gradient). Autograd through `naive.attend_rows`, chunk by chunk. Returns dq, dk, dv."""
    p = FullParams(16, 16, scale, softcap)  # block_size / topk do not enter the output
    B, Hq, T, d = q.shape
    ct = naive.compute_dtype(q.dtype)
    dq = torch.empty_like(q)
    dk = torch.zeros(k.shape, dtype=ct, device=k.device)
    dv = torch.zeros(v.shape, dtype=ct, device=v.device)
    sk = None if sinks is None else sinks.detach().to(ct)
    for t0, t1 in query_chunks(B, Hq, T):
        with torch.enable_grad():
            leaves = [x.detach().to(ct).requires_grad_() for x in (q[:, :, t0:t1], k[:, :, :t1], v[:, :, :t1])]
            o, _, _, _ = naive.attend_rows(*leaves, torch.arange(t0, t1, device=q.device), sk, p)
            gq, gk, gv = torch.autograd.grad(o, leaves, dout[:, :, t0:t1].to(ct))
        dq[:, :, t0:t1] = gq.to(q.dtype)
        dk[:, :, :t1] += gk
        dv[:, :, :t1] += gv
    return dq, dk.to(k.dtype), dv.to(v.dtype)


def full_attention_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_len: Tensor, block_size: int,
                          topk: int, scale: float, *, sinks: Tensor | None = None, softcap: float = 0.0):
    """One new token per sequence at position cache_len - 1: the naive math as it is (one query row).
    q [B, Hq, 1, d], k_cache/v_cache [B, Hkv, S, d], cache_len int [B] -> out [B, Hq, 1, d], indices [B, Hkv, 1, nsel]
    """
    return naive.full_attention_decode(q, k_cache, v_cache, cache_len.to(q.device), sinks,
                                       FullParams(block_size, topk, scale, softcap))


def full_attention_extend(q: Tensor, k_cache: Tensor, v_cache: Tensor, start: Tensor, block_size: int, topk: int,
                          scale: float, *, sinks: Tensor | None = None, softcap: float = 0.0):
    """R new tokens per row at positions start[b] + r over the cache, chunked over the new tokens.
    -> out [B, Hq, R, d], indices int32 [B, Hkv, R, nsel]"""
    p = FullParams(block_size, topk, scale, softcap)
    B, Hq, R, d = q.shape
    out = torch.empty_like(q)
    indices = torch.empty(B, k_cache.shape[1], R, p.nsel, dtype=torch.int32, device=q.device)
    start = start.to(q.device)
    with torch.no_grad():
        for r0, r1 in query_chunks(B, Hq, R, k_cache.shape[2]):
            pos = naive.extend_positions(start, r1)[:, r0:]
            o, idx, _, _ = naive.full_rows(q[:, :, r0:r1], k_cache, v_cache, pos, sinks, p)
            out[:, :, r0:r1], indices[:, :, r0:r1] = o.to(q.dtype), idx
    return out, indices
