"""The sparse layer's math, once (docs/design.md, `sparse_attention`): a sparse branch over the shared K/V at the
selected blocks, an SWA branch over the layer's own K/V in the last `window` positions, a per-head sink in each
denominator, gates on the branch outputs; `merge` (training-free) is one softmax over selected blocks and window.

`sparse_rows` serves every form of the op: the shared keys are a linear sequence (key i at position i); the SWA
branch's keys come with their positions (`win_pos`, -1 = an empty slot), so the same code reads the layer's own K/V
in prefill (positions 0..T-1), the ring buffer in decode (position p in slot p % W) and the ring plus this call's
tokens in extend.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..params import SparseParams
from .common import compute_dtype, logits, positions, ring_positions, selected_keys, sink_logits, \
    softmax_with_sink, window_keys
from .full_attention import extend_positions


def _gated(o: Tensor, gate: Tensor | None) -> Tensor:
    return o if gate is None else o * gate.to(o.dtype)


def sparse_rows(q: Tensor, k_shared: Tensor, v_shared: Tensor, indices: Tensor, query_pos: Tensor, k_win: Tensor,
                v_win: Tensor, win_pos: Tensor, gate_sparse: Tensor | None, gate_swa: Tensor | None,
                sinks: Tensor | None, p: SparseParams):
    """Sparse layer for query rows at `query_pos` (in the dtype of the inputs: cast first). Differentiable.

    q [B, Hq, R, d]; k_shared/v_shared [B, Hkv, S, d]; indices int [B, Hkv, R, nsel] (-1 = none); query_pos int
    [B | 1, R]; k_win/v_win [B, Hkv, K, d] with win_pos int [K] or [B | 1, K] the SWA branch's keys (not read with
    merge, which takes the window from k_shared); gates [B, Hq, R, 1 | d] or None; sinks [Hq] or None
    -> out [B, Hq, R, d], lse float32 [B, Hq, R, 2] (each branch's keys alone, -inf where a branch saw no key;
    branch 0 sparse or merged, branch 1 SWA), (o_sparse, o_swa) ungated (o_swa None without an SWA branch).
    """
    B, Hq, R, d = q.shape
    Hkv, S = k_shared.shape[1], k_shared.shape[2]
    sink = sink_logits(sinks, Hkv, q.dtype)
    sel = selected_keys(indices, p.block_size, S, query_pos)  # [B, Hkv, R, S]
    s_sh = logits(q, k_shared, p.scale, p.softcap)  # [B, Hkv, G, R, S]
    no_key = torch.full((B, Hq, R), float("-inf"), dtype=torch.float32, device=q.device)
    if p.merge:  # training-free: one softmax over selected blocks ∪ window of the layer's own K/V (passed as shared)
        if p.has_window:
            sel = sel | window_keys(torch.arange(S, device=q.device), positions(query_pos, R), p.window).unsqueeze(1)
        o, lse = softmax_with_sink(s_sh, sel.unsqueeze(2), v_shared, sink)
        return o, torch.stack([lse.reshape(B, Hq, R).float(), no_key], -1), (o, None)
    o_sp, lse_sp = softmax_with_sink(s_sh, sel.unsqueeze(2), v_shared, sink)
    out, o_swa, lse_swa = _gated(o_sp, gate_sparse), None, no_key
    if p.has_window:
        visible = window_keys(win_pos, positions(query_pos, R), p.window)  # [B | 1, R, K]
        o_swa, lse_w = softmax_with_sink(logits(q, k_win, p.scale, p.softcap), visible.unsqueeze(1).unsqueeze(1),
                                         v_win, sink)
        out = out + _gated(o_swa, gate_swa)
        lse_swa = lse_w.reshape(B, Hq, R).float()
    return out, torch.stack([lse_sp.reshape(B, Hq, R).float(), lse_swa], -1), (o_sp, o_swa)


def _cast(ct, *tensors):
    return tuple(None if t is None else t.to(ct) for t in tensors)


def sparse_attention(q: Tensor, k_own: Tensor, v_own: Tensor, k_shared: Tensor, v_shared: Tensor, indices: Tensor,
                     gate_sparse: Tensor | None, gate_swa: Tensor | None, sinks: Tensor | None, p: SparseParams,
                     save_branches: bool = False):
    """Prefill: row t at position t; k_own/v_own are the SWA branch's keys (positions 0..T-1).

    -> out [B, Hq, T, d] (q's dtype), lse float32 [B, Hq, T, 2], branch_out [2, B, Hq, T, d] (ungated sparse/merged
    and SWA outputs, q's dtype) when save_branches, else empty.
    """
    T = q.shape[2]
    ct = compute_dtype(q.dtype)
    pos = torch.arange(T, device=q.device)
    out, lse, (o_sp, o_swa) = sparse_rows(*_cast(ct, q, k_shared, v_shared), indices, pos, *_cast(ct, k_own, v_own),
                                          pos, *_cast(ct, gate_sparse, gate_swa, sinks), p)
    if not save_branches:
        return out.to(q.dtype), lse, q.new_empty(0)
    branches = torch.stack([o_sp, torch.zeros_like(o_sp) if o_swa is None else o_swa]).to(q.dtype)
    return out.to(q.dtype), lse, branches


def sparse_attention_decode(q: Tensor, k_win: Tensor, v_win: Tensor, k_shared: Tensor, v_shared: Tensor,
                            indices: Tensor, cache_len: Tensor, gate_sparse: Tensor | None, gate_swa: Tensor | None,
                            sinks: Tensor | None, p: SparseParams) -> Tensor:
    """One new token per row at t = cache_len - 1 (docs/design.md, Decode). q [B, Hq, 1, d]; k_win/v_win
    [B, Hkv, W, d] the SWA ring (position p in slot p % W); k_shared/v_shared [B, Hkv, S, d]; indices
    [B, Hkv, 1, nsel] -> out [B, Hq, 1, d] (q's dtype)."""
    ct = compute_dtype(q.dtype)
    pos = cache_len.long().reshape(-1, 1) - 1
    win_pos = ring_positions(cache_len, k_win.shape[2])  # [B, W]
    out, _, _ = sparse_rows(*_cast(ct, q, k_shared, v_shared), indices, pos, *_cast(ct, k_win, v_win), win_pos,
                            *_cast(ct, gate_sparse, gate_swa, sinks), p)
    return out.to(q.dtype)


def sparse_attention_extend(q: Tensor, k_shared: Tensor, v_shared: Tensor, indices: Tensor, k_win: Tensor,
                            v_win: Tensor, win_pos: Tensor, start: Tensor, gate_sparse: Tensor | None,
                            gate_swa: Tensor | None, sinks: Tensor | None, p: SparseParams) -> Tensor:
    """R new tokens per row at positions `start[b] + r`. k_shared/v_shared [B, Hkv, S, d] (linear, new tokens
    written); k_win/v_win [B, Hkv, K, d] with win_pos int [B, K] (-1 = empty): the keys the SWA branch may read (ring
    slots followed by the new tokens, or a linear cache); indices [B, Hkv, R, nsel] -> out [B, Hq, R, d]."""
    ct = compute_dtype(q.dtype)
    out, _, _ = sparse_rows(*_cast(ct, q, k_shared, v_shared), indices, extend_positions(start, q.shape[2]),
                            *_cast(ct, k_win, v_win), win_pos, *_cast(ct, gate_sparse, gate_swa, sinks), p)
    return out.to(q.dtype)


__all__ = ["sparse_rows", "sparse_attention", "sparse_attention_decode", "sparse_attention_extend"]
