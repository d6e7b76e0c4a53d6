"""Sparse-layer extend on Triton: R new query rows per sequence at positions `start[b] + r` (chunked prefill,
speculative verification), both branches in one attention kernel.

The prefill forward's token-major tiling (`sparse_attention.py`): one program owns `m_tok` consecutive new rows of
one KV group times its G query heads, walks the sorted union of the tile's selected blocks
(`block_union.tile_block_union` on the extend indices) over the shared cache with the causal bound at each row's
position, then the SWA branch, then the prefill epilogue (sinks in each denominator, gates, one write of `out`).

The SWA branch reads the keys `k_win` holds at the positions `win_pos` says (the ring's slots then this call's
tokens, or a linear cache; -1 = empty): `_window_slots_kernel` (an atomic max over the slots) first inverts the
table over the only positions a row can see, `start[b] - window + 1 .. start[b] + R - 1` (`slots [B, window + R -
1]`, the slot holding each position or -1), so a tile reads just its `window + m_tok - 1` positions whatever K is.
A position held by several slots is read from the last of them (the runtime's layouts hold each position once).
`merge=True` (training-free): one softmax over the selected blocks and the window keys of the shared cache (linear),
a window key of a block the row selected counted once; `k_win` is not read. Forward only. Launches: the window
slots (a fill and the kernel), the tile union, the attention kernel.
"""

import torch
import triton
import triton.language as tl

from .block_union import tile_block_union
from .common import LOG2E, direct, soft_cap, softcap2
from .online_softmax import online_softmax_step
from .sparse_attention import (_epilogue, gate_mode, gate_strides, in_window, kv_block, last_dim_unit, launch_config,
                               row_selected, row_selection, union_walk, window_blocks)


@triton.jit
def _window_slots_kernel(WPOS, START, SLOTS, swpb, swpk, sslb, K, L, window, BLOCK: tl.constexpr):
    """Program (b, chunk of BLOCK slots): SLOTS[b, p - (START[b] - window + 1)] = max(itself, k) for each slot k of
    the chunk whose position p = WPOS[b, k] lies in START[b] - window + 1 .. START[b] - window + L (SLOTS starts at
    -1: each position ends with the last slot holding it, or -1)."""
    b = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    base = tl.load(START + b) - window + 1
    p = tl.load(WPOS + b * swpb + k.to(tl.int64) * swpk, mask=k < K, other=-1)
    rel = p - base
    ok = (k < K) & (p >= 0) & (rel >= 0) & (rel < L)
    tl.atomic_max(SLOTS + b * sslb + tl.where(ok, rel, 0), k, mask=ok)


def launch_window_slots(win_pos, start, window, R, wrap=direct):
    """int32 [B, window + R - 1]: the slot of `win_pos` int [B, K] (-1 = empty) holding each position
    start[b] - window + 1 + i, or -1 (start int32 [B])."""
    B, K = win_pos.shape
    L = window + R - 1
    slots = torch.full((B, L), -1, dtype=torch.int32, device=win_pos.device)
    block = 1024
    wrap(_window_slots_kernel)[(B, triton.cdiv(K, block))](
        win_pos, start, slots, win_pos.stride(0), win_pos.stride(1), slots.stride(0), K, L, window, BLOCK=block,
        num_warps=4)
    return slots


@triton.jit
def _sparse_extend_kernel(
    Q, KS, VS, KW, VW, SLOTS, START, UNION, BITS, COUNT, IDX, GS, GW, SINKS, OUT, LSE,
    sqb, sqh, sqt, sksb, sksh, skst, svsb, svsh, svst, skwb, skwh, skwt, svwb, svwh, svwt, sslb,
    sub, suh, sut, sib, sih, sit,
    sgsb, sgsh, sgst, sgsd, sgwb, sgwh, sgwt, sgwd, sob, soh, sot,
    R, HKV, NSEL, qk_scale2, cap2, window,
    G: tl.constexpr, M_TOK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    NSEL_P2: tl.constexpr, MERGE: tl.constexpr, HAS_SWA: tl.constexpr, HAS_SINKS: tl.constexpr,
    GS_MODE: tl.constexpr, GW_MODE: tl.constexpr, SOFTCAP: tl.constexpr,
):
    qk_scale2 = tl.cast(qk_scale2, tl.float32)  # a traced caller passes Python floats as fp64
    tile = tl.program_id(0)
    bg = tl.program_id(1)
    b = bg // HKV
    g = bg % HKV
    s0 = tl.load(START + b)  # position of row 0
    t0 = tile * M_TOK  # first row of the tile
    rows = tl.arange(0, BLOCK_M)
    row_tok = rows // G
    heads = g * G + rows % G
    r = t0 + row_tok  # [BLOCK_M] row among the R new tokens (indexes q, indices, gates, out)
    qpos = s0 + r  # [BLOCK_M] its position (bounds the keys)
    row_ok = (rows < M_TOK * G) & (r < R)
    n_keys = s0 + R  # cache entries that exist for this call
    dd = tl.arange(0, D)
    cols = tl.arange(0, BLOCK_N)

    q_off = b.to(tl.int64) * sqb + heads.to(tl.int64) * sqh + r.to(tl.int64) * sqt
    q = tl.load(Q + q_off[:, None] + dd[None, :], mask=row_ok[:, None], other=0.0)  # [BLOCK_M, D]

    # ---- sparse (or merged) branch: the union of the tile's selected blocks of the shared cache
    m_s = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_s = tl.zeros([BLOCK_M], tl.float32)
    acc_s = tl.zeros([BLOCK_M, D], tl.float32)
    u_base = b.to(tl.int64) * sub + g.to(tl.int64) * suh + tile.to(tl.int64) * sut
    n_union = tl.load(COUNT + (b * HKV + g) * tl.cdiv(R, M_TOK) + tile)
    ks_base = KS + b.to(tl.int64) * sksb + g.to(tl.int64) * sksh
    vs_base = VS + b.to(tl.int64) * svsb + g.to(tl.int64) * svsh
    m_s, l_s, acc_s = union_walk(q, m_s, l_s, acc_s, UNION, BITS, u_base, n_union, ks_base, vs_base, skst, svst,
                                 n_keys, row_tok, row_ok, qpos, qk_scale2, cap2, b, g, HKV, BLOCK_N, D, SOFTCAP, 0)

    # ---- window: keys qpos - window < p <= qpos
    m_w = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_w = tl.zeros([BLOCK_M], tl.float32)
    acc_w = tl.zeros([BLOCK_M, D], tl.float32)
    if HAS_SWA:
        if MERGE:  # the shared cache's window blocks, minus the keys of blocks the row selected
            sel = row_selection(IDX, b, g, r, row_ok, sib, sih, sit, NSEL, NSEL_P2)
            lo, hi = window_blocks(s0 + t0, n_keys, window, M_TOK, BLOCK_N)
            for j in range(lo, hi + 1):
                kpos, k, v = kv_block(ks_base, vs_base, j, skst, svst, n_keys, BLOCK_N, D)
                s = soft_cap(tl.dot(q, tl.trans(k)) * qk_scale2, cap2, SOFTCAP)
                ok = in_window(kpos, qpos, row_ok, window) & (~row_selected(sel, j))[:, None]
                s = tl.where(ok, s, float("-inf"))
                m_s, l_s, acc_s = online_softmax_step(s, v, m_s, l_s, acc_s)
        else:  # the SWA branch: k_win's keys found by position through SLOTS
            p_lo = tl.maximum(s0 + t0 - window + 1, 0)
            p_hi = s0 + tl.minimum(t0 + M_TOK, R) - 1
            base = s0 - window + 1  # the position of SLOTS[b, 0]
            kw_base = KW + b.to(tl.int64) * skwb + g.to(tl.int64) * skwh
            vw_base = VW + b.to(tl.int64) * svwb + g.to(tl.int64) * svwh
            for p0 in range(p_lo, p_hi + 1, BLOCK_N):
                kpos = p0 + cols
                slot = tl.load(SLOTS + b.to(tl.int64) * sslb + (kpos - base), mask=kpos <= p_hi, other=-1)
                kok = slot >= 0
                k = tl.load(kw_base + slot.to(tl.int64)[:, None] * skwt + dd[None, :], mask=kok[:, None], other=0.0)
                v = tl.load(vw_base + slot.to(tl.int64)[:, None] * svwt + dd[None, :], mask=kok[:, None], other=0.0)
                s = soft_cap(tl.dot(q, tl.trans(k)) * qk_scale2, cap2, SOFTCAP)
                ok = in_window(kpos, qpos, row_ok, window) & kok[None, :]
                s = tl.where(ok, s, float("-inf"))
                m_w, l_w, acc_w = online_softmax_step(s, v, m_w, l_w, acc_w)
    _epilogue(m_s, l_s, acc_s, m_w, l_w, acc_w, GS, GW, SINKS, OUT, LSE, LSE, b, heads, r, row_ok,
              sgsb, sgsh, sgst, sgsd, sgwb, sgwh, sgwt, sgwd, sob, soh, sot, R, HKV, G, BLOCK_M, D, HAS_SINKS,
              GS_MODE, GW_MODE, False)


def launch_extend(q, k_shared, v_shared, k_win, v_win, slots, start, indices, work, gate_sparse, gate_swa, sinks,
                  out, lse, block_size, window, scale, softcap, merge, m_tok, wrap=direct):
    """Launch the extend kernel. q, caches, gates with unit last stride; slots int32 [B, window + R - 1]
    (`launch_window_slots`; any int32 tensor when not read: merge or no window); start int32 [B]; indices int32
    [B, Hkv, R, nsel]; work = (union, bits, count) of `tile_block_union(indices, m_tok)`; out [B, Hq, R, d] and
    lse float32 [B, Hq, R, 2] contiguous, written. `wrap`: how the kernel is launched."""
    B, Hq, R, D = q.shape
    Hkv = k_shared.shape[1]
    G = Hq // Hkv
    nsel = indices.shape[-1]
    union, bits, count = work
    m_tok, block_m, num_warps, num_stages = launch_config(G, D, block_size, m_tok)
    wrap(_sparse_extend_kernel)[(triton.cdiv(R, m_tok), B * Hkv)](
        q, k_shared, v_shared, k_win, v_win, slots, start, union, bits, count, indices,
        gate_sparse if gate_sparse is not None else out, gate_swa if gate_swa is not None else out,
        sinks if sinks is not None else out, out, lse,
        *q.stride()[:3], *k_shared.stride()[:3], *v_shared.stride()[:3], *k_win.stride()[:3], *v_win.stride()[:3],
        slots.stride(0), *union.stride()[:3], *indices.stride()[:3],
        *gate_strides(gate_sparse), *gate_strides(gate_swa), *out.stride()[:3],
        R, Hkv, nsel, scale * LOG2E, softcap2(softcap), window,
        G=G, M_TOK=m_tok, BLOCK_M=block_m, BLOCK_N=block_size, D=D, NSEL_P2=triton.next_power_of_2(nsel),
        MERGE=bool(merge), HAS_SWA=window > 0, HAS_SINKS=sinks is not None, GS_MODE=gate_mode(gate_sparse),
        GW_MODE=gate_mode(gate_swa), SOFTCAP=bool(softcap), num_warps=num_warps, num_stages=num_stages,
    )


def sparse_attention_extend(q, k_shared, v_shared, indices, k_win, v_win, win_pos, start, gate_sparse, gate_swa,
                            sinks, block_size, window, scale, merge, m_tok=None, *, softcap=0.0):
    """The sparse layer for R new tokens per row at positions start[b] + r.

    q [B, Hq, R, d]; k_shared/v_shared [B, Hkv, S, d] linear (position = slot), the new tokens written; indices int
    [B, Hkv, R, nsel] (ascending, distinct, -1 padded); k_win/v_win [B, Hkv, K, d] with win_pos int [B, K] (-1 =
    empty) the SWA branch's keys (not read with merge or window 0); start int [B]; gates None or [B, Hq, R, 1 | d]
    (any strides); sinks None or [Hq]; softcap 0.0 (off) or > 0. `m_tok`: tokens per program (default ~64 rows).
    -> out [B, Hq, R, d] (q.dtype, contiguous).
    """
    B, Hq, R, D = q.shape
    Hkv = k_shared.shape[1]
    G = Hq // Hkv
    q, k_shared, v_shared = (last_dim_unit(x) for x in (q, k_shared, v_shared))
    gate_sparse, gate_swa = last_dim_unit(gate_sparse), last_dim_unit(gate_swa)
    start = start.to(device=q.device, dtype=torch.int32).contiguous()
    indices = indices.to(torch.int32).contiguous()
    m_tok = m_tok or launch_config(G, D, block_size)[0]
    work = tile_block_union(indices, m_tok)
    if window > 0 and not merge:
        k_win, v_win = last_dim_unit(k_win), last_dim_unit(v_win)
        slots = launch_window_slots(win_pos.to(q.device), start, window, R)
    else:  # not read
        k_win, v_win, slots = k_shared, v_shared, start
    out = torch.empty(B, Hq, R, D, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, Hq, R, 2, device=q.device, dtype=torch.float32)
    launch_extend(q, k_shared, v_shared, k_win, v_win, slots, start, indices, work, gate_sparse, gate_swa, sinks,
                  out, lse, block_size, window, scale, softcap, merge, m_tok)
    return out


__all__ = ["sparse_attention_extend", "launch_extend", "launch_window_slots"]
