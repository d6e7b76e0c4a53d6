"""Several new tokens per row against a non-empty cache (chunked prefill, speculative verification): the exact
HySparse math of SPEC §2.1–2.2 for queries at positions `start[b] + r`, in plain PyTorch (any device), chunked so
that at most [B, Hq, chunk, keys] logits exist at once. One new token per row goes through the decode ops
(fused kernels) instead; a prefill of an empty cache goes through the prefill ops.

Shapes: q [B, Hq, R, d]; caches [B, Hkv, S, d]; start int [B] (tokens cached before the call, so row b's new
tokens sit at positions start[b] .. start[b] + R - 1 and are already written where the layer reads them).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..kernels.reference.full_attention import _grouped, block_max, compute_dtype, query_chunks
from ..kernels.reference.select_blocks import select_blocks
from ..kernels.reference.sparse_attention import block_key_mask, softmax_with_sink


def _sdpa_layout(x: Tensor) -> Tensor:
    """[B, H, R, d] laid out as SDPA returns it ([B, R, H, d] in memory): graphs captured from SDPA models view
    `out.transpose(1, 2)` without a copy."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def _positions(start: Tensor, r0: int, r1: int) -> Tensor:
    """int64 [B, r1 - r0]: positions of new tokens r0..r1-1 of each row."""
    return start.view(-1, 1).long() + torch.arange(r0, r1, device=start.device).view(1, -1)


def full_attention_extend(q: Tensor, k_cache: Tensor, v_cache: Tensor, start: Tensor, block_size: int, topk: int,
                          scale: float) -> tuple[Tensor, Tensor]:
    """Causal attention of R new queries over the cache, block scores and selection (as prefill rows would give).

    -> out [B, Hq, R, d], indices int32 [B, Hkv, R, topk // block_size]
    """
    B, Hq, R, d = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    ct = compute_dtype(q.dtype)
    kc, vc = k_cache.to(ct), v_cache.to(ct)
    keys = torch.arange(S, device=q.device).view(1, 1, 1, 1, S)
    outs, picks = [], []
    for r0, r1 in query_chunks(B, Hq, R, S):
        pos = _positions(start, r0, r1)  # [B, C]
        logits = torch.einsum("bhgcd,bhkd->bhgck", _grouped(q[:, :, r0:r1].to(ct), Hkv), kc) * scale
        logits = logits.masked_fill(keys > pos.view(B, 1, 1, -1, 1), float("-inf"))
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        outs.append(torch.einsum("bhgck,bhkd->bhgcd", torch.exp(logits - lse), vc).reshape(B, Hq, r1 - r0, d))
        group = torch.exp(block_max(logits, block_size) - lse).amax(dim=2)  # [B, Hkv, C, nb]
        picks.append(select_blocks(group, pos, block_size, topk // block_size))
    return _sdpa_layout(torch.cat(outs, dim=2).to(q.dtype)), torch.cat(picks, dim=2)


def sparse_attention_extend(q: Tensor, k_shared: Tensor, v_shared: Tensor, indices: Tensor, k_win: Tensor,
                            v_win: Tensor, win_pos: Tensor, start: Tensor, *, block_size: int, window: int | None,
                            gate_sparse, gate_swa, sinks, scale: float, merge: bool) -> Tensor:
    """The sparse layer for R new queries.

    k_shared/v_shared [B, Hkv, S, d]: the cache the sparse branch reads (linear: position = slot), new tokens
    written. k_win/v_win [B, Hkv, K, d] with win_pos int64 [B, K] (-1 = empty): the keys the SWA branch may read
    (ring slots followed by the new tokens, or a linear cache). indices [B, Hkv, R, nsel]. With merge=True one
    softmax over (selected ∪ window) keys of k_shared; k_win is not read. -> out [B, Hq, R, d]
    """
    B, Hq, R, d = q.shape
    Hkv, S = k_shared.shape[1], k_shared.shape[2]
    G = Hq // Hkv
    ct = compute_dtype(q.dtype)
    ksh, vsh = k_shared.to(ct), v_shared.to(ct)
    kw, vw = k_win.to(ct), v_win.to(ct)
    sink = sinks.to(ct).view(Hkv, G) if sinks is not None else None
    linear = torch.arange(S, device=q.device).view(1, 1, S)
    outs = []
    for r0, r1 in query_chunks(B, Hq, R, S + k_win.shape[2]):
        pos = _positions(start, r0, r1).view(B, -1, 1)  # [B, C, 1]
        qg = _grouped(q[:, :, r0:r1].to(ct), Hkv)  # [B, Hkv, G, C, d]
        sel = block_key_mask(indices[:, :, r0:r1], S, block_size) & (linear <= pos).unsqueeze(1)  # [B, Hkv, C, S]
        logits_sh = torch.einsum("bhgcd,bhkd->bhgck", qg, ksh) * scale
        if merge:
            win = (linear <= pos) & (linear > pos - (window or 0))  # [B, C, S]
            o, _ = softmax_with_sink(logits_sh, (sel | win.unsqueeze(1)).unsqueeze(2), vsh, sink)
            outs.append(o.reshape(B, Hq, r1 - r0, d))
            continue
        o_sp, _ = softmax_with_sink(logits_sh, sel.unsqueeze(2), vsh, sink)
        out = o_sp.reshape(B, Hq, r1 - r0, d)
        if gate_sparse is not None:
            out = out * gate_sparse[:, :, r0:r1].to(ct)
        if window:
            wp = win_pos.view(B, 1, -1)
            valid = (wp >= 0) & (wp <= pos) & (wp > pos - window)  # [B, C, K]
            logits_w = torch.einsum("bhgcd,bhkd->bhgck", qg, kw) * scale
            o_swa, _ = softmax_with_sink(logits_w, valid.view(B, 1, 1, r1 - r0, -1), vw, sink)
            o_swa = o_swa.reshape(B, Hq, r1 - r0, d)
            out = out + (o_swa * gate_swa[:, :, r0:r1].to(ct) if gate_swa is not None else o_swa)
        outs.append(out)
    return _sdpa_layout(torch.cat(outs, dim=2).to(q.dtype))
