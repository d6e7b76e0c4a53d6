"""HySparse attention over paged KV caches: the PyTorch path (any device; what runs on CPU) and the varlen contract
the Triton kernels (`paged_triton.py`) implement. No vLLM import: the ops are plain tensors in, tensors out.

A batch is varlen: `N` query tokens of `R` requests laid end to end. Request `r` owns query rows
`query_start_loc[r] .. query_start_loc[r+1]-1`; its context holds `seq_lens[r]` tokens (this step's included), so its
first query token sits at position `seq_lens[r] - query_len[r]`. Chunked-prefill pieces (many rows) and decode
tokens (one row) mix freely. A layer's cache is paged: `k_cache, v_cache [num_pages, Hkv, page, d]` (any strides),
token position `p` of request `r` at page `block_table[r, p // page]`, row `p % page`. Selection blocks (`block_size`
tokens, indices counted from position 0) and pages are independent: every key is translated through the block table.

    out, indices = paged_full_attention(q, k_cache, v_cache, block_table, query_start_loc, seq_lens,
                                        block_size=16, nsel=4, scale=d ** -0.5)
    branches = paged_sparse_attention(q2, k_cache, v_cache, block_table, k_win, v_win, win_table, indices,
                                      query_start_loc, seq_lens, sinks, block_size=16, window=32, scale=d ** -0.5)
    out2 = apply_gates(branches, gate_sparse, gate_swa)

The math is the runtime's extend path (`runtime/extend.py`), the exactness target: a request's rows equal what
`compiled.generate` computes for that request alone, whatever else shares the batch.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ...kernels.naive import block_key_mask, compute_dtype, softmax_with_sink
from ...kernels.naive import grouped as _grouped
from ...kernels.reference import query_chunks
from ...runtime import extend


def write_kv(key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """Store this step's K/V: key/value [N, Hkv, d] at slots `slot_mapping [>=N]` (slot s = page s // page_size,
    row s % page_size; negative slots are padding and skipped). k_cache/v_cache [num_pages, Hkv, page, d]."""
    n = key.shape[0]
    slots = slot_mapping[:n].long()
    keep = slots >= 0
    if not bool(keep.all()):
        slots, key, value = slots[keep], key[keep], value[keep]
    page = k_cache.shape[2]
    k_cache[slots // page, :, slots % page] = key.to(k_cache.dtype)
    v_cache[slots // page, :, slots % page] = value.to(v_cache.dtype)


def gather_positions(cache: Tensor, block_table_row: Tensor, positions: Tensor) -> Tensor:
    """Keys of one request at `positions [S]` read through its block table: cache [num_pages, Hkv, page, d]
    -> [Hkv, S, d]."""
    page = cache.shape[2]
    pages = block_table_row.long()[positions // page]
    return cache[pages, :, positions % page].transpose(0, 1)


def _requests(query_start_loc: Tensor, seq_lens: Tensor):
    """(row0, row1, start, seq_len) per request with at least one query row (python ints; one host sync)."""
    qsl, lens = query_start_loc.tolist(), seq_lens.tolist()
    for r in range(len(qsl) - 1):
        row0, row1, seq_len = qsl[r], qsl[r + 1], lens[r]
        if row1 > row0:
            yield r, row0, row1, seq_len - (row1 - row0), seq_len


def paged_full_attention_torch(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor,
                               query_start_loc: Tensor, seq_lens: Tensor, block_size: int, nsel: int,
                               scale: float) -> tuple[Tensor, Tensor]:
    """The full layer (paper §3.2; docs/design.md, full_attention) for a varlen batch: q [N, Hq, d] -> out
    [N, Hq, d], indices int32 [N, Hkv, nsel] (selected block indices per token and KV group, ascending, -1 padded). Rows past the last request are zero / -1.
    """
    N, Hq, d = q.shape
    Hkv = k_cache.shape[1]
    out = q.new_zeros(N, Hq, d)
    indices = torch.full((N, Hkv, nsel), -1, dtype=torch.int32, device=q.device)
    for r, row0, row1, start, seq_len in _requests(query_start_loc, seq_lens):
        pos = torch.arange(seq_len, device=q.device)
        k = gather_positions(k_cache, block_table[r], pos).unsqueeze(0)  # [1, Hkv, S, d]
        v = gather_positions(v_cache, block_table[r], pos).unsqueeze(0)
        q_r = q[row0:row1].transpose(0, 1).unsqueeze(0)  # [1, Hq, Q, d]
        start_t = torch.tensor([start], device=q.device)
        o, idx = extend.full_attention_extend(q_r, k, v, start_t, block_size, nsel * block_size, scale)
        out[row0:row1] = o[0].transpose(0, 1)
        indices[row0:row1] = idx[0].transpose(0, 1)
    return out, indices


def _sparse_rows(q, k_sh, v_sh, idx, k_w, v_w, win_pos, start, block_size, window, sinks, scale, merge):
    """One request's sparse layer, both branches ungated. q [1, Hq, Q, d]; k_sh/v_sh [1, Hkv, S, d] (position = slot);
    idx [1, Hkv, Q, nsel]; k_w/v_w [1, Hkv, K, d] at win_pos [1, K] -> [2, Q, Hq, d] (branch 1 zero when absent)."""
    _, Hq, Q, d = q.shape
    Hkv, S = k_sh.shape[1], k_sh.shape[2]
    ct = compute_dtype(q.dtype)
    ksh, vsh = k_sh.to(ct), v_sh.to(ct)
    sink = sinks.to(ct).view(Hkv, Hq // Hkv) if sinks is not None else None
    linear = torch.arange(S, device=q.device).view(1, 1, S)
    out = torch.zeros(2, Q, Hq, d, dtype=ct, device=q.device)
    for r0, r1 in query_chunks(1, Hq, Q, S + (k_w.shape[2] if k_w is not None else 0)):
        pos = (start + torch.arange(r0, r1, device=q.device)).view(1, -1, 1)  # [1, C, 1]
        qg = _grouped(q[:, :, r0:r1].to(ct), Hkv)  # [1, Hkv, G, C, d]
        sel = block_key_mask(idx[:, :, r0:r1], S, block_size) & (linear <= pos).unsqueeze(1)  # [1, Hkv, C, S]
        logits_sh = torch.einsum("bhgcd,bhkd->bhgck", qg, ksh) * scale
        if merge:
            win = (linear <= pos) & (linear > pos - (window or 0))
            mask = sel | win.unsqueeze(1)
        else:
            mask = sel
        o_sp, _ = softmax_with_sink(logits_sh, mask.unsqueeze(2), vsh, sink)
        out[0, r0:r1] = o_sp.reshape(Hq, r1 - r0, d).transpose(0, 1)
        if window and not merge:
            wp = win_pos.view(1, 1, -1)
            valid = (wp >= 0) & (wp <= pos) & (wp > pos - window)  # [1, C, K]
            logits_w = torch.einsum("bhgcd,bhkd->bhgck", qg, k_w.to(ct)) * scale
            o_w, _ = softmax_with_sink(logits_w, valid.view(1, 1, 1, r1 - r0, -1), v_w.to(ct), sink)
            out[1, r0:r1] = o_w.reshape(Hq, r1 - r0, d).transpose(0, 1)
    return out


def paged_sparse_attention_torch(q: Tensor, k_shared: Tensor, v_shared: Tensor, shared_block_table: Tensor,
                                 k_win: Tensor, v_win: Tensor, win_block_table: Tensor, indices: Tensor,
                                 query_start_loc: Tensor, seq_lens: Tensor, sinks: Tensor | None, block_size: int,
                                 window: int, scale: float, merge: bool) -> Tensor:
    """The sparse layer (paper §3.3; the training-free merge: docs/design.md, sparse_attention) for a varlen batch,
    gates not applied.

    q [N, Hq, d]; k_shared/v_shared: the pages the sparse branch reads (the full layer's, or the layer's own for
    kv_sharing="none" / merge) with shared_block_table; k_win/v_win + win_block_table: the pages the SWA branch reads
    (the layer's own window pages; only positions inside the window are read, so pages vLLM freed behind the window
    are never touched); indices int32 [N, Hkv, nsel] from the full layer; sinks [Hq] or None; window 0 = no SWA
    branch. -> branches [N, 2, Hq, d]: the sparse (or, with merge, merged) branch and the SWA branch (zeros when
    absent), each softmax with the sink in its denominator.
    """
    N, Hq, d = q.shape
    out = q.new_zeros(N, 2, Hq, d)
    for r, row0, row1, start, seq_len in _requests(query_start_loc, seq_lens):
        pos = torch.arange(seq_len, device=q.device)
        k_sh = gather_positions(k_shared, shared_block_table[r], pos).unsqueeze(0)
        v_sh = gather_positions(v_shared, shared_block_table[r], pos).unsqueeze(0)
        k_w = v_w = win_pos = None
        if window and not merge:
            win_pos = torch.arange(max(0, start - window + 1), seq_len, device=q.device)
            k_w = gather_positions(k_win, win_block_table[r], win_pos).unsqueeze(0)
            v_w = gather_positions(v_win, win_block_table[r], win_pos).unsqueeze(0)
            win_pos = win_pos.unsqueeze(0)
        q_r = q[row0:row1].transpose(0, 1).unsqueeze(0)
        idx = indices[row0:row1].transpose(0, 1).unsqueeze(0)
        branches = _sparse_rows(q_r, k_sh, v_sh, idx, k_w, v_w, win_pos, start, block_size, window, sinks, scale,
                                merge)
        out[row0:row1] = branches.transpose(0, 1).to(q.dtype)
    return out


def apply_gates(branches: Tensor, gate_sparse: Tensor | None, gate_swa: Tensor | None) -> Tensor:
    """out = gate_sparse * o_sparse + gate_swa * o_swa (paper §3.3; a missing gate is 1, a missing branch is 0).

    branches [N, 2, Hq, d]; gates [N, Hq, 1] (gate="head") or [N, Hq, d] (gate="element") -> [N, Hq, d].
    Computed in float32 (float64 for float64 inputs) like the reference, then cast to the branches' dtype.
    """
    ct = compute_dtype(branches.dtype)
    o_sp, o_swa = branches[:, 0].to(ct), branches[:, 1].to(ct)
    out = o_sp * gate_sparse.to(ct) if gate_sparse is not None else o_sp
    out = out + (o_swa * gate_swa.to(ct) if gate_swa is not None else o_swa)
    return out.to(branches.dtype)
