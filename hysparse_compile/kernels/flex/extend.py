"""Flex extend: R > 1 new tokens per row against a filled cache (chunked prefill, speculative verification).

Row r of sequence b sits at position `start[b] + r`. The full layer is causal flex with that offset in its
`mask_mod`, then the block scores and selection of `full_attention.block_scores_and_select` at those positions; the
sparse layer's sparse branch reads the selected-block table by row (as the prefill's), its SWA branch the window
keys by their positions (`win_pos`: the ring's slots and this call's tokens). Block masks are built per call (the
offsets differ per row), which on CUDA is a compiled `create_block_mask`.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.attention import flex_attention as _fa

from ..naive import block_table, extend_positions
from .full_attention import block_scores_and_select, flex_attend, softcap_score, with_sink


def _block_mask(mask_mod, B: int, H: int | None, R: int, S: int, device):
    return _fa.create_block_mask(mask_mod, B, H, R, S, device=device, _compile=device.type == "cuda")


def full_attention_extend(q: Tensor, k_cache: Tensor, v_cache: Tensor, start: Tensor, block_size: int, topk: int,
                          scale: float, *, sinks: Tensor | None = None, softcap: float = 0.0):
    """q [B, Hq, R, d]; k_cache/v_cache [B, Hkv, S, d] (the new tokens written); start int [B]
    -> out [B, Hq, R, d], indices int32 [B, Hkv, R, topk // block_size]"""
    B, _, R, _ = q.shape
    pos = extend_positions(start.to(q.device), R)  # [B, R]

    def causal_from_start(b, h, q_idx, kv_idx):
        return kv_idx <= pos[b, q_idx]

    with torch.no_grad():
        mask = _block_mask(causal_from_start, B, None, R, k_cache.shape[2], q.device)
        out, lse = flex_attend(q, k_cache, v_cache, mask, scale, score_mod=softcap_score(softcap))
        indices, _ = block_scores_and_select(q, k_cache, lse, block_size, topk // block_size, scale, False,
                                             softcap=softcap, sinks=sinks, query_pos=pos)
    return with_sink(out, lse, sinks).to(q.dtype), indices


def sparse_attention_extend(q: Tensor, k_shared: Tensor, v_shared: Tensor, indices: Tensor, k_win: Tensor,
                            v_win: Tensor, win_pos: Tensor, start: Tensor, gate_sparse, gate_swa, sinks, block_size: int,
                            window: int, scale: float, merge: bool, *, softcap: float = 0.0) -> Tensor:
    """The sparse layer for R new tokens per row (shapes: `functional.sparse_attention_extend`) -> out [B, Hq, R, d]"""
    B, Hq, R, _ = q.shape
    Hkv, S = k_shared.shape[1], k_shared.shape[2]
    G, nb = Hq // Hkv, -(-S // block_size)
    pos = extend_positions(start.to(q.device), R)  # [B, R]
    score_mod = softcap_score(softcap)
    merge_window = window if merge else 0
    with torch.no_grad():
        table = block_table(indices, nb)  # [B, Hkv, R, nb + 1]

        def selected(b, h, q_idx, kv_idx):
            t = pos[b, q_idx]
            picked = table[b, h // G, q_idx, torch.clamp(kv_idx // block_size, max=nb)]
            return (kv_idx <= t) & (picked | (t - kv_idx < merge_window))

        o_sp, lse_sp = flex_attend(q, k_shared, v_shared, _block_mask(selected, B, Hq, R, S, q.device), scale,
                                   score_mod=score_mod)
        out = with_sink(o_sp, lse_sp, sinks)
        if merge:
            return out.to(q.dtype)
        if gate_sparse is not None:
            out = out * gate_sparse.float()
        if window:
            wp = win_pos.to(q.device).long()  # [B, K]

            def in_window(b, h, q_idx, kv_idx):
                p, t = wp[b, kv_idx], pos[b, q_idx]
                return (p >= 0) & (p <= t) & (p > t - window)

            o_w, lse_w = flex_attend(q, k_win, v_win, _block_mask(in_window, B, None, R, k_win.shape[2], q.device),
                                     scale, score_mod=score_mod)
            o_w = with_sink(o_w, lse_w, sinks)
            out = out + (o_w * gate_swa.float() if gate_swa is not None else o_w)
    return out.to(q.dtype)
