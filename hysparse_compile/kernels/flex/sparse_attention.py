"""Flex sparse layer: the sparse branch exact per token through a `mask_mod` lookup, the SWA branch as a
sliding-window block mask, sinks through the returned lse, gates outside the kernel, soft-capping as a score_mod
(docs/design.md, `sparse_attention`).

The sparse branch's `mask_mod` reads a boolean table [B, Hkv, T, nb + 1] scattered from the indices (column nb
swallows the -1 padding); its `block_mask` is the union of the selected blocks over each 128-row query tile, so
flex visits every block any token of the tile selected and the mask_mod keeps each token exact. That union is
the weak spot of a block-mask design: when neighbouring tokens pick different blocks, flex computes far more
than it keeps.
"""
from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor
from torch.nn.attention import flex_attention as _fa

from ..naive import block_table
from ..reference import sparse_attention_decode as _torch_sparse_decode
from .full_attention import Q_BLOCK, flex_attend, kernel_options, softcap_score, with_sink


def _tile_union(table: Tensor, T: int, nb: int) -> Tensor:
    """[B, Hkv, T, nb + 1] -> [B, Hkv, nqb, nb]: blocks selected by any token of each Q_BLOCK-row tile."""
    B, Hkv = table.shape[:2]
    nqb = -(-T // Q_BLOCK)
    padded = torch.nn.functional.pad(table[..., :nb], (0, 0, 0, nqb * Q_BLOCK - T))
    return padded.view(B, Hkv, nqb, Q_BLOCK, nb).any(dim=3)


def _window_union(T: int, nb: int, block_size: int, window: int, device) -> Tensor:
    """[nqb, nb] bool: key blocks that overlap some row's window (t - window, t] inside each query tile."""
    nqb = -(-T // Q_BLOCK)
    r0 = torch.arange(nqb, device=device).view(-1, 1) * Q_BLOCK
    r1 = torch.clamp(r0 + Q_BLOCK - 1, max=T - 1)
    j = torch.arange(nb, device=device).view(1, -1)
    return (j * block_size <= r1) & ((j + 1) * block_size - 1 >= r0 - window + 1)


def _mask_from_union(union: Tensor, mask_mod, T: int, kv_block: int):
    """BlockMask whose partial blocks are `union` [B, H, nqb, nkb] (H = Hq), refined by mask_mod."""
    counts = union.sum(-1, dtype=torch.int32)  # [B, H, nqb]
    order = torch.argsort(union.to(torch.uint8), dim=-1, descending=True, stable=True).to(torch.int32)
    return _fa.BlockMask.from_kv_blocks(counts, order, BLOCK_SIZE=(Q_BLOCK, kv_block), mask_mod=mask_mod,
                                        seq_lengths=(T, T))


def sparse_block_mask(indices: Tensor, T: int, Hq: int, block_size: int, merge_window: int = 0,
                      kv_block: int | None = None):
    """BlockMask of the sparse branch (or, with merge_window > 0, of the merged selected-or-window mask).

    indices int32 [B, Hkv, T, nsel]; the mask is exact per token: key i is visible to query t (head h) iff i <= t and
    block i // block_size is among t's selected blocks for KV group h // G (or t - i < merge_window).
    `kv_block` (a multiple of block_size, default block_size) coarsens the block-level union only: a superset, so the
    result is the same, but flex's own default tiles fit it (its compiled backward rejects 64-key mask blocks).
    """
    B, Hkv = indices.shape[:2]
    G, nb = Hq // Hkv, -(-T // block_size)
    table = block_table(indices, nb)  # [B, Hkv, T, nb + 1]
    union = _tile_union(table, T, nb)  # [B, Hkv, nqb, nb]
    if merge_window:
        union = union | _window_union(T, nb, block_size, merge_window, indices.device)
    kv_block = kv_block or block_size
    if kv_block != block_size:
        f = kv_block // block_size
        union = torch.nn.functional.pad(union, (0, -(-nb // f) * f - nb)).unflatten(-1, (-1, f)).any(-1)

    def selected_or_window(b, h, q_idx, kv_idx):
        row = torch.clamp(q_idx, max=T - 1)
        picked = table[b, h // G, row, torch.clamp(kv_idx // block_size, max=nb)]
        near = (q_idx - kv_idx) < merge_window
        return (kv_idx <= q_idx) & (picked | near)

    def selected_blocks(b, h, q_idx, kv_idx):
        row = torch.clamp(q_idx, max=T - 1)
        return (kv_idx <= q_idx) & table[b, h // G, row, torch.clamp(kv_idx // block_size, max=nb)]

    mask_mod = selected_or_window if merge_window else selected_blocks
    return _mask_from_union(union.repeat_interleave(G, dim=1), mask_mod, T, kv_block)


@lru_cache(maxsize=32)
def window_block_mask(T: int, window: int, block_size: int, device: torch.device):
    """Sliding-window BlockMask: key i visible to query t iff t - window < i <= t (cached per shape)."""
    def sliding_window(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < window)

    return _fa.create_block_mask(sliding_window, None, None, T, T, device=device, BLOCK_SIZE=(Q_BLOCK, block_size),
                                 _compile=device.type == "cuda")


def _forward(q, k_own, v_own, k_shared, v_shared, indices, gate_sparse, gate_swa, sinks, block_size, window,
             scale, merge, for_backward=False, softcap=0.0):
    """Differentiable sparse layer. Returns out float32 [B, Hq, T, d], lse float32 [B, Hq, T, 2].

    for_backward: on CUDA the recomputed forward uses 128-key mask blocks and flex's own tiles, because its
    compiled backward finds no kernel for 64-key mask blocks with pinned tiles (seen on an H100, torch 2.11)."""
    B, Hq, T, d = q.shape
    kv_block = max(block_size, 128) if for_backward and q.device.type == "cuda" else block_size
    opts = None if kv_block != block_size else kernel_options(q.device, Q_BLOCK, block_size)
    no_key = torch.full((B, Hq, T), float("-inf"), device=q.device)
    with torch.no_grad():
        sparse_mask = sparse_block_mask(indices, T, Hq, block_size, window if merge else 0, kv_block)
    score_mod = softcap_score(softcap)
    o_sp, lse_sp = flex_attend(q, k_shared, v_shared, sparse_mask, scale, opts, score_mod)
    out = with_sink(o_sp, lse_sp, sinks)
    if merge:
        return out, torch.stack([lse_sp, no_key], -1)
    if gate_sparse is not None:
        out = out * gate_sparse.float()
    lse_swa = no_key
    if window:
        o_swa, lse_swa = flex_attend(q, k_own, v_own, window_block_mask(T, window, kv_block, q.device), scale,
                                     opts, score_mod)
        o_swa = with_sink(o_swa, lse_swa, sinks)
        out = out + (o_swa * gate_swa.float() if gate_swa is not None else o_swa)
    return out, torch.stack([lse_sp, lse_swa], -1)


def sparse_attention_fwd(q, k_own, v_own, k_shared, v_shared, indices, gate_sparse, gate_swa, sinks,
                         block_size, window, scale, merge, save_branches, *, softcap: float = 0.0):
    """See docs/design.md. q [B, Hq, T, d], k_*/v_* [B, Hkv, T, d], indices int32 [B, Hkv, T, nsel]
    -> out [B, Hq, T, d], lse float32 [B, Hq, T, 2], branch_out (always empty: the backward recomputes)."""
    with torch.no_grad():
        out, lse = _forward(q, k_own, v_own, k_shared, v_shared, indices, gate_sparse, gate_swa, sinks,
                            block_size, window, scale, merge, softcap=softcap)
    return out.to(q.dtype), lse, q.new_empty(0)


def sparse_attention_bwd(dout, q, k_own, v_own, k_shared, v_shared, indices, gate_sparse, gate_swa, sinks,
                         out, lse, branch_out, block_size, window, scale, merge, *, softcap: float = 0.0):
    """Gradients by recomputing the flex forward under autograd (zeros for K/V a branch did not read, None for
    absent gates/sinks). Returns (dq, dk_own, dv_own, dk_shared, dv_shared, dgate_sparse, dgate_swa, dsinks)."""
    with torch.enable_grad():
        leaves = [None if x is None else x.detach().requires_grad_()
                  for x in (q, k_own, v_own, k_shared, v_shared, gate_sparse, gate_swa, sinks)]
        q_, ko, vo, ks, vs, gsp, gsw, sk = leaves
        o, _ = _forward(q_, ko, vo, ks, vs, indices, gsp, gsw, sk, block_size, window, scale, merge,
                        for_backward=True, softcap=softcap)
        live = [x for x in leaves if x is not None]
        grads = iter(torch.autograd.grad(o, live, dout.float(), allow_unused=True))
    result = []
    for x in leaves:
        g = None if x is None else next(grads)
        result.append(None if x is None else (torch.zeros_like(x) if g is None else g.to(x.dtype)))
    return tuple(result)


def sparse_attention_decode(q, k_win, v_win, k_shared, v_shared, indices, cache_len, gate_sparse, gate_swa, sinks,
                            block_size, window, scale, merge, *, softcap: float = 0.0):
    """One query row per sequence: plain torch (a block mask over one row saves nothing over a masked row).

    q [B, Hq, 1, d]; k_win/v_win [B, Hkv, W, d] ring buffer; k_shared/v_shared [B, Hkv, S, d];
    indices [B, Hkv, 1, nsel]; cache_len [B] -> out [B, Hq, 1, d]
    """
    return _torch_sparse_decode(q, k_win, v_win, k_shared, v_shared, indices, cache_len, gate_sparse, gate_swa,
                                sinks, block_size, window, scale, merge, softcap=softcap)
