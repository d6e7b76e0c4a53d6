"""Triton kernels of the paged ops (CUDA; on CPU they run under TRITON_INTERPRET=1, which is how they are tested).

Contract and shapes: `paged.py`. One program per (query token, KV group); its rows are the group's G query heads
(padded to GP >= 16 for `tl.dot`). Keys are read tile by tile, one selection block (`block_size` tokens) per tile,
each key translated through the block table (`page = block_table[r, p // PAGE]`, row `p % PAGE`), so selection
blocks and vLLM's pages are independent. Softmax is online in the log2 domain (`online_softmax.py`).

- `_paged_full_kernel`: causal attention over positions 0..t; each tile's per-row max logit is kept in a scratch
  buffer `[N, Hkv, blocks, G]`; after the loop the block scores `exp(max - lse)` are reduced over the group's rows
  and written per (token, group, block); selection (top-k, ties to the lower block, ascending) is `select_blocks`
  on them.
- `_paged_sparse_kernel`: the sparse branch over the selected blocks of the shared pages, then either the SWA
  branch over the window of the layer's own pages (its own softmax), or with merge the window keys outside the
  selected blocks in the same softmax; sinks join each denominator; both branches are written ungated.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...kernels.naive import select_blocks
from ...kernels.triton.common import LOG2E, LOG2E_C
from ...kernels.triton.online_softmax import normalize_with_sink, online_softmax_step


@triton.jit
def _load_tile(C, BT, req, kpos, kok, g, s_page, s_head, s_row, s_bt, dd, PAGE: tl.constexpr):
    """Keys at positions kpos [N] of request `req`, head g, read through its block table -> [N, D]."""
    page = tl.load(BT + req.to(tl.int64) * s_bt + (kpos // PAGE), mask=kok, other=0).to(tl.int64)
    row = (kpos % PAGE).to(tl.int64)
    ptr = C + page[:, None] * s_page + g.to(tl.int64) * s_head + row[:, None] * s_row + dd[None, :]
    return tl.load(ptr, mask=kok[:, None], other=0.0)


@triton.jit
def _token_query(Q, TREQ, TPOS, n, g, sq_n, sq_h, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr):
    """Token n's G query heads of KV group g: (q [GP, D], rows, row_ok, heads, its request, its position)."""
    rows = tl.arange(0, GP)
    row_ok = rows < G
    dd = tl.arange(0, D)
    heads = g * G + rows
    q = tl.load(Q + n.to(tl.int64) * sq_n + heads[:, None].to(tl.int64) * sq_h + dd[None, :],
                mask=row_ok[:, None], other=0.0)
    return q, rows, row_ok, heads, tl.load(TREQ + n), tl.load(TPOS + n)


@triton.jit
def _paged_full_kernel(
    Q, KC, VC, BT, TREQ, TPOS, OUT, BMAX, SCORES,
    sq_n, sq_h, skp, skh, skr, svp, svh, svr, s_bt, so_n, so_h, NB, HKV, qk_scale2,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, PAGE: tl.constexpr,
):
    n = tl.program_id(0)
    g = tl.program_id(1)
    q, rows, row_ok, heads, req, t = _token_query(Q, TREQ, TPOS, n, g, sq_n, sq_h, G, GP, D)
    dd = tl.arange(0, D)
    cols = tl.arange(0, BLOCK)
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    bmax_base = BMAX + ((n * HKV + g).to(tl.int64) * NB) * G  # per-row tile maxima [NB, G]
    for j in range(0, t // BLOCK + 1):
        kpos = j * BLOCK + cols
        kok = kpos <= t
        k = _load_tile(KC, BT, req, kpos, kok, g, skp, skh, skr, s_bt, dd, PAGE)
        v = _load_tile(VC, BT, req, kpos, kok, g, svp, svh, svr, s_bt, dd, PAGE)
        s = tl.where(kok[None, :], tl.dot(q, tl.trans(k)) * qk_scale2, float("-inf"))
        tl.store(bmax_base + j * G + rows, tl.max(s, axis=1), mask=row_ok)
        m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc)
    out = acc / l_i[:, None]
    tl.store(OUT + n.to(tl.int64) * so_n + heads[:, None].to(tl.int64) * so_h + dd[None, :], out,
             mask=row_ok[:, None])
    lse2 = m_i + tl.log2(l_i)  # [GP]
    s_base = SCORES + (n * HKV + g).to(tl.int64) * NB
    for j in range(0, t // BLOCK + 1):
        bm = tl.load(bmax_base + j * G + rows, mask=row_ok, other=float("-inf"))
        score = tl.where(row_ok, tl.exp2(bm - lse2), 0.0)
        tl.store(s_base + j, tl.max(score, axis=0))


@triton.jit
def _paged_sparse_kernel(
    Q, KS, VS, BTS, KW, VW, BTW, IDX, TREQ, TPOS, SINKS, OUT,
    sq_n, sq_h, sksp, sksh, sksr, svsp, svsh, svsr, s_bts, skwp, skwh, skwr, svwp, svwh, svwr, s_btw,
    si_n, si_h, so_n, so_b, so_h, NSEL, window, qk_scale2,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, PAGE_S: tl.constexpr,
    PAGE_W: tl.constexpr, NSEL_P2: tl.constexpr, MERGE: tl.constexpr, HAS_SWA: tl.constexpr,
    HAS_SINKS: tl.constexpr,
):
    n = tl.program_id(0)
    g = tl.program_id(1)
    q, rows, row_ok, heads, req, t = _token_query(Q, TREQ, TPOS, n, g, sq_n, sq_h, G, GP, D)
    dd = tl.arange(0, D)
    cols = tl.arange(0, BLOCK)
    if HAS_SINKS:
        sink2 = tl.load(SINKS + heads, mask=row_ok, other=0.0).to(tl.float32) * LOG2E_C
    else:
        sink2 = tl.full([GP], float("-inf"), tl.float32)
    i_base = IDX + n.to(tl.int64) * si_n + g.to(tl.int64) * si_h
    o_base = OUT + n.to(tl.int64) * so_n + heads[:, None].to(tl.int64) * so_h + dd[None, :]
    # sparse branch: the selected blocks of the shared pages (-1 = none; causal inside the last block)
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    for kk in range(0, NSEL):
        j = tl.load(i_base + kk)
        kpos = j * BLOCK + cols
        kok = (kpos >= 0) & (kpos <= t)  # j = -1 (padding) gives negative positions
        k = _load_tile(KS, BTS, req, kpos, kok, g, sksp, sksh, sksr, s_bts, dd, PAGE_S)
        v = _load_tile(VS, BTS, req, kpos, kok, g, svsp, svsh, svsr, s_bts, dd, PAGE_S)
        s = tl.where(kok[None, :], tl.dot(q, tl.trans(k)) * qk_scale2, float("-inf"))
        m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc)
    lo = tl.maximum(t - window + 1, 0)
    if MERGE:  # window keys not already counted in a selected block, same softmax, shared (= own) pages
        sel = tl.load(i_base + tl.arange(0, NSEL_P2), mask=tl.arange(0, NSEL_P2) < NSEL, other=-1)
        for c in range(0, tl.cdiv(window, BLOCK) + 1):
            kpos = (lo // BLOCK) * BLOCK + c * BLOCK + cols
            picked = tl.sum(((kpos // BLOCK)[:, None] == sel[None, :]).to(tl.int32), axis=1) > 0
            kok = (kpos >= lo) & (kpos <= t) & ~picked
            k = _load_tile(KS, BTS, req, kpos, kok, g, sksp, sksh, sksr, s_bts, dd, PAGE_S)
            v = _load_tile(VS, BTS, req, kpos, kok, g, svsp, svsh, svsr, s_bts, dd, PAGE_S)
            s = tl.where(kok[None, :], tl.dot(q, tl.trans(k)) * qk_scale2, float("-inf"))
            m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc)
    tl.store(o_base, normalize_with_sink(m_i, l_i, acc, sink2), mask=row_ok[:, None])
    if HAS_SWA:  # SWA branch: positions t-window+1..t of the window pages, its own softmax
        m_w = tl.full([GP], float("-inf"), tl.float32)
        l_w = tl.zeros([GP], tl.float32)
        acc_w = tl.zeros([GP, D], tl.float32)
        for c in range(0, tl.cdiv(window, BLOCK) + 1):
            kpos = (lo // BLOCK) * BLOCK + c * BLOCK + cols
            kok = (kpos >= lo) & (kpos <= t)
            k = _load_tile(KW, BTW, req, kpos, kok, g, skwp, skwh, skwr, s_btw, dd, PAGE_W)
            v = _load_tile(VW, BTW, req, kpos, kok, g, svwp, svwh, svwr, s_btw, dd, PAGE_W)
            s = tl.where(kok[None, :], tl.dot(q, tl.trans(k)) * qk_scale2, float("-inf"))
            m_w, l_w, acc_w = online_softmax_step(s, v, m_w, l_w, acc_w)
        tl.store(o_base + so_b, normalize_with_sink(m_w, l_w, acc_w, sink2), mask=row_ok[:, None])


def token_positions(query_start_loc: torch.Tensor, seq_lens: torch.Tensor, n: int):
    """Per query row: its request and its position. -> (req int32 [n], pos int32 [n]); no host sync."""
    qsl = query_start_loc.long()
    rows = torch.arange(n, device=qsl.device)
    req = torch.searchsorted(qsl[1:], rows, right=True).clamp(max=seq_lens.shape[0] - 1)
    pos = seq_lens.long()[req] - (qsl[req + 1] - rows)
    return req.to(torch.int32), pos.to(torch.int32)


def _check(block_size: int, head_dim: int, dtype) -> None:
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"paged Triton kernels: block_size must be a power of two >= 16, got {block_size}")
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"paged Triton kernels: head dim must be a power of two >= 16, got {head_dim}; "
                         f"HYSPARSE_VLLM_KERNELS=torch runs the PyTorch path instead")


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def paged_full_attention(q, k_cache, v_cache, block_table, query_start_loc, seq_lens, block_size, nsel, scale):
    """Triton launcher of `paged.paged_full_attention_torch` (same contract)."""
    N, Hq, D = q.shape
    Hkv, page = k_cache.shape[1], k_cache.shape[2]
    _check(block_size, D, q.dtype)
    G = Hq // Hkv
    GP = max(16, triton.next_power_of_2(G))
    q, k_cache, v_cache = _unit_last(q), _unit_last(k_cache), _unit_last(v_cache)
    block_table = block_table.to(torch.int32)
    req, pos = token_positions(query_start_loc, seq_lens, N)
    nb = max(1, -(-block_table.shape[1] * page // block_size))  # blocks the widest block table can address
    out = torch.zeros(N, Hq, D, dtype=q.dtype, device=q.device)
    bmax = torch.empty(N, Hkv, nb, G, dtype=torch.float32, device=q.device)
    scores = torch.zeros(N, Hkv, nb, dtype=torch.float32, device=q.device)
    if N:
        _paged_full_kernel[(N, Hkv)](
            q, k_cache, v_cache, block_table, req, pos, out, bmax, scores,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_table.stride(0), out.stride(0),
            out.stride(1), nb, Hkv, float(scale) * LOG2E,
            G=G, GP=GP, D=D, BLOCK=block_size, PAGE=page,
        )
    indices = select_blocks(scores.permute(1, 0, 2).unsqueeze(0), block_size, nsel, pos.long())  # [1, Hkv, N, nsel]
    return out, indices[0].permute(1, 0, 2).contiguous()


def paged_sparse_attention(q, k_shared, v_shared, shared_block_table, k_win, v_win, win_block_table, indices,
                           query_start_loc, seq_lens, sinks, block_size, window, scale, merge):
    """Triton launcher of `paged.paged_sparse_attention_torch` (same contract)."""
    N, Hq, D = q.shape
    Hkv = k_shared.shape[1]
    _check(block_size, D, q.dtype)
    G = Hq // Hkv
    GP = max(16, triton.next_power_of_2(G))
    nsel = indices.shape[-1]
    q, k_shared, v_shared = _unit_last(q), _unit_last(k_shared), _unit_last(v_shared)
    k_win, v_win = _unit_last(k_win), _unit_last(v_win)
    bts, btw = shared_block_table.to(torch.int32), win_block_table.to(torch.int32)
    req, pos = token_positions(query_start_loc, seq_lens, N)
    out = torch.zeros(N, 2, Hq, D, dtype=q.dtype, device=q.device)
    idx = indices.to(torch.int32)
    sink_arg = sinks if sinks is not None else q  # unused when HAS_SINKS is False
    if N:
        _paged_sparse_kernel[(N, Hkv)](
            q, k_shared, v_shared, bts, k_win, v_win, btw, idx, req, pos, sink_arg, out,
            q.stride(0), q.stride(1), k_shared.stride(0), k_shared.stride(1), k_shared.stride(2),
            v_shared.stride(0), v_shared.stride(1), v_shared.stride(2), bts.stride(0),
            k_win.stride(0), k_win.stride(1), k_win.stride(2), v_win.stride(0), v_win.stride(1), v_win.stride(2),
            btw.stride(0), idx.stride(0), idx.stride(1), out.stride(0), out.stride(1), out.stride(2),
            nsel, int(window), float(scale) * LOG2E,
            G=G, GP=GP, D=D, BLOCK=block_size, PAGE_S=k_shared.shape[2], PAGE_W=k_win.shape[2],
            NSEL_P2=max(2, triton.next_power_of_2(nsel)), MERGE=bool(merge),
            HAS_SWA=bool(window) and not merge, HAS_SINKS=sinks is not None,
        )
    return out
