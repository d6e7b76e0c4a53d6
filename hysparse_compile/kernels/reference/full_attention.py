"""Reference full-attention layer: causal attention, block scores, block selection (SPEC §2.1).

Plain PyTorch, any device. Queries are processed in chunks so that no more than [B, Hq, chunk, T] logits exist at
once; block scores come from the per-block max of the logits, rescaled by the row's log-sum-exp (paper Alg. 1).
The backward recomputes each chunk and applies the softmax gradient analytically (no T x T tensor is kept).
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from .select_blocks import select_blocks

_CHUNK_ELEMS = 1 << 25  # logits per chunk (128 MiB in float32); read at call time, see `query_chunk_elems`


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@contextlib.contextmanager
def query_chunk_elems(n: int):
    """Within the block, every query chunk of the reference prefill ops (forward and backward) and of
    `runtime.extend` holds at most `n` logits (at least one query row per chunk). Tests force small chunks so the
    chunk-offset code runs at small T (by default a chunk holds 2**25 logits: one chunk up to T ~ 1k at 32 heads).
    Not thread-safe; for tests and debugging.

    >>> with query_chunk_elems(1):  # one query row per chunk
    ...     list(query_chunks(1, 1, 3))
    [(0, 1), (1, 2), (2, 3)]
    """
    global _CHUNK_ELEMS
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"query_chunk_elems takes a positive int (logits per chunk), got {n!r}")
    old, _CHUNK_ELEMS = _CHUNK_ELEMS, n
    try:
        yield
    finally:
        _CHUNK_ELEMS = old


def query_chunks(B: int, Hq: int, T: int, Tk: int | None = None):
    """Yield (t0, t1) query ranges small enough that [B, Hq, t1 - t0, Tk] logits fit the chunk budget."""
    Tk = T if Tk is None else Tk
    step = max(1, min(T, _CHUNK_ELEMS // max(1, B * Hq * Tk)))
    for t0 in range(0, T, step):
        yield t0, min(T, t0 + step)


def _grouped(x: Tensor, Hkv: int) -> Tensor:
    """[B, Hq, R, d] -> [B, Hkv, G, R, d] (query head h belongs to KV group h // G)."""
    B, Hq, R, d = x.shape
    return x.view(B, Hkv, Hq // Hkv, R, d)


def causal_logits(q: Tensor, k: Tensor, t0: int, scale: float) -> Tensor:
    """Scaled logits of query rows t0.. against keys 0..t1-1, future keys at -inf.

    q: [B, Hq, C, d] (rows t0..t0+C-1), k: [B, Hkv, t1, d] -> [B, Hkv, G, C, t1]
    """
    C, t1 = q.shape[2], k.shape[2]
    logits = torch.einsum("bhgcd,bhkd->bhgck", _grouped(q, k.shape[1]), k) * scale
    rows = torch.arange(t0, t0 + C, device=q.device).view(C, 1)
    future = torch.arange(t1, device=q.device).view(1, t1) > rows
    return logits.masked_fill(future, float("-inf"))


def block_max(logits: Tensor, block_size: int) -> Tensor:
    """[..., Tk] -> [..., ceil(Tk / block_size)] max over each key block (-inf pads the last block)."""
    Tk = logits.shape[-1]
    nb = -(-Tk // block_size)
    padded = torch.nn.functional.pad(logits, (0, nb * block_size - Tk), value=float("-inf"))
    return padded.view(*logits.shape[:-1], nb, block_size).amax(-1)


def _chunk_forward(q: Tensor, k: Tensor, v: Tensor, t0: int, scale: float):
    """Differentiable causal attention for one query chunk. Returns out [B, Hq, C, d], lse [B, Hq, C], logits."""
    B, Hq, C, d = q.shape
    logits = causal_logits(q, k, t0, scale)  # [B, Hkv, G, C, t1]
    lse = torch.logsumexp(logits, dim=-1)  # [B, Hkv, G, C]
    p = torch.exp(logits - lse.unsqueeze(-1))
    out = torch.einsum("bhgck,bhkd->bhgcd", p, v)
    return out.reshape(B, Hq, C, d), lse.reshape(B, Hq, C), logits


def full_attention_fwd(q: Tensor, k: Tensor, v: Tensor, block_size: int, topk: int, scale: float,
                       return_scores: bool):
    """q [B, Hq, T, d], k/v [B, Hkv, T, d] -> out [B, Hq, T, d], indices int32 [B, Hkv, T, nsel],
    lse float32 [B, Hq, T], scores float32 [B, Hq, T, nb] (empty unless return_scores)."""
    B, Hq, T, d = q.shape
    Hkv = k.shape[1]
    nb, nsel = -(-T // block_size), topk // block_size
    ct = compute_dtype(q.dtype)
    out = torch.empty_like(q)
    lse = torch.empty(B, Hq, T, dtype=torch.float32, device=q.device)
    indices = torch.empty(B, Hkv, T, nsel, dtype=torch.int32, device=q.device)
    scores = torch.zeros(B, Hq, T, nb, dtype=torch.float32, device=q.device) if return_scores else None
    with torch.no_grad():
        for t0, t1 in query_chunks(B, Hq, T):
            qc, kc, vc = q[:, :, t0:t1].to(ct), k[:, :, :t1].to(ct), v[:, :, :t1].to(ct)
            o, l, logits = _chunk_forward(qc, kc, vc, t0, scale)
            out[:, :, t0:t1] = o.to(q.dtype)
            lse[:, :, t0:t1] = l.float()
            s = torch.exp(block_max(logits, block_size) - l.view(B, Hkv, Hq // Hkv, -1, 1))  # [B,Hkv,G,C,nbc]
            if scores is not None:
                scores[:, :, t0:t1, : s.shape[-1]] = s.reshape(B, Hq, t1 - t0, -1).float()
            group = s.amax(dim=2)  # [B, Hkv, C, nbc]
            pos = torch.arange(t0, t1, device=q.device)
            indices[:, :, t0:t1] = select_blocks(group, pos, block_size, nsel)
    empty = q.new_empty(0, dtype=torch.float32)
    return out, indices, lse, scores if scores is not None else empty


def full_attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float):
    """Gradients of the causal attention output (selection is not differentiated). Returns dq, dk, dv.

    Per query chunk: p = softmax(logits), dlogits = p * (dout.v - rowsum(dout * out)), then the two matmuls back.
    """
    B, Hq, T, d = q.shape
    Hkv = k.shape[1]
    ct = compute_dtype(q.dtype)
    dq = torch.empty_like(q)
    dk = torch.zeros(k.shape, dtype=ct, device=k.device)
    dv = torch.zeros(v.shape, dtype=ct, device=v.device)
    for t0, t1 in query_chunks(B, Hq, T):
        qc, kc, vc = q[:, :, t0:t1].to(ct), k[:, :, :t1].to(ct), v[:, :, :t1].to(ct)
        qg, do = _grouped(qc, Hkv), _grouped(dout[:, :, t0:t1].to(ct), Hkv)
        logits = causal_logits(qc, kc, t0, scale)  # [B, Hkv, G, C, t1]
        p = torch.softmax(logits, dim=-1)
        o = torch.einsum("bhgck,bhkd->bhgcd", p, vc)
        dlogits = p * (torch.einsum("bhgcd,bhkd->bhgck", do, vc) - (do * o).sum(-1, keepdim=True))
        dq[:, :, t0:t1] = (torch.einsum("bhgck,bhkd->bhgcd", dlogits, kc) * scale).reshape(B, Hq, -1, d).to(q.dtype)
        dk[:, :, :t1] += torch.einsum("bhgck,bhgcd->bhkd", dlogits, qg) * scale
        dv[:, :, :t1] += torch.einsum("bhgck,bhgcd->bhkd", p, do)
    return dq, dk.to(k.dtype), dv.to(v.dtype)


def full_attention_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_len: Tensor, block_size: int,
                          topk: int, scale: float):
    """One new token per sequence at position cache_len - 1.

    q [B, Hq, 1, d], k_cache/v_cache [B, Hkv, S, d], cache_len int [B] -> out [B, Hq, 1, d], indices [B, Hkv, 1, nsel]
    """
    B, Hq, _, d = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    ct = compute_dtype(q.dtype)
    pos = (cache_len.to(q.device).long() - 1).view(B, 1)  # [B, 1]
    logits = torch.einsum("bhgcd,bhkd->bhgck", _grouped(q.to(ct), Hkv), k_cache.to(ct)) * scale  # [B,Hkv,G,1,S]
    future = torch.arange(S, device=q.device).view(1, S) > pos  # [B, S]
    logits = logits.masked_fill(future.view(B, 1, 1, 1, S), float("-inf"))
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    out = torch.einsum("bhgck,bhkd->bhgcd", torch.exp(logits - lse), v_cache.to(ct)).reshape(B, Hq, 1, d)
    group = torch.exp(block_max(logits, block_size) - lse).amax(dim=2)  # [B, Hkv, 1, nb]
    return out.to(q.dtype), select_blocks(group, pos, block_size, topk // block_size)

