"""Triton backward of the sparse-layer op.

Two loop orders for the sparse branch (`order`; "auto" = `choose_backward_order`): K/V-block-major
(`block_major.block_grads`: each selected key block loaded once for all the tokens that picked it, dq by fp32
atomics; the default from 4k tokens) or token-major, the forward's tiling (tokens x G heads per program), below. The
SWA branch is always token-major. Design and measurements: docs/kernels_sparse.md.

Token-major: the dq program recomputes its rows' probabilities block by block (from the forward's per-branch
log-sum-exp, sinks folded in) over the same per-tile union (`block_union.tile_block_union`, one Triton launch), keeps dq in registers
and writes it once. dK/dV: one program per key block walks the query tiles whose union holds it (the inverse of the
tile unions) and writes it once (default), or the dq pass adds them with fp32 atomics (`kv_mode="atomic"`).
Gates and sinks get their gradients from the saved ungated branch outputs:
`dgate = dout * o_branch` and `dsink_h = -sum_rows exp(sink_h - L_branch) * (do_branch . o_branch)`.
"""

import torch
import triton
import triton.language as tl

from . import sparse_attention as fwd
from .block_major import block_grads
from .block_union import tile_block_union
from .common import soft_cap_with_slope, softcap2
from .sparse_attention import (LOG2E, gate_mode, gate_offsets, gate_strides, in_window, kv_block,
                               last_dim_unit, launch_config, layout_like, row_member, row_offsets, row_selected,
                               row_selection, sparse_attention_fwd, window_blocks)


@triton.jit
def _block_grads(q, do, k, v, ok, l2, delta, qk_scale2, cap2, SOFTCAP: tl.constexpr):
    """dS, P of one K/V block for the tile's rows (0 outside `ok`); dS is with respect to the raw (uncapped)
    logits. Returns (ds, p) in float32."""
    s = tl.dot(q, tl.trans(k)) * qk_scale2
    if SOFTCAP:
        s, slope = soft_cap_with_slope(s, cap2)
    p = tl.where(ok, tl.exp2(s - l2[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v))
    ds = p * (dp - delta[:, None])
    if SOFTCAP:
        ds = ds * slope
    return ds, p


@triton.jit
def _sparse_bwd_kernel(
    Q, KS, VS, KO, VO, DOS, DOW, LS, LW, DS, DW, UNION, BITS, COUNT, IDX,
    DQ_ACC, DQ, DKS, DVS, DKO, DVO,
    sqb, sqh, sqt, sksb, sksh, skst, svsb, svsh, svst, skob, skoh, skot, svob, svoh, svot,
    sdqb, sdqh, sdqt, sub, suh, sut, sib, sih, sit,
    T, HKV, NSEL, qk_scale2, scale, cap2, window,
    G: tl.constexpr, M_TOK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    NSEL_P2: tl.constexpr, MERGE: tl.constexpr, HAS_SWA: tl.constexpr, ATOMIC_KV: tl.constexpr,
    SPARSE: tl.constexpr, DQ_INIT: tl.constexpr, SOFTCAP: tl.constexpr,
):
    """dq of one query tile (and dK/dV with atomics when ATOMIC_KV). SPARSE: walk the tile union (False: the sparse
    branch is done block-major, `block_major.block_grads`, whose fp32 dq sum DQ_INIT loads and completes). dq is
    written with its own strides (sdq*: q's layout, so the op returns it without a copy); the fp32 sums (DQ_ACC, the
    atomic dK/dV) are contiguous [B, H, T, D]."""
    tile = tl.program_id(0)
    bg = tl.program_id(1)
    b = bg // HKV
    g = bg % HKV
    t0 = tile * M_TOK
    rows = tl.arange(0, BLOCK_M)
    row_tok = rows // G
    heads = g * G + rows % G
    tpos = t0 + row_tok
    row_ok = (rows < M_TOK * G) & (tpos < T)
    dd = tl.arange(0, D)

    q_off = b.to(tl.int64) * sqb + heads.to(tl.int64) * sqh + tpos.to(tl.int64) * sqt
    q = tl.load(Q + q_off[:, None] + dd[None, :], mask=row_ok[:, None], other=0.0)  # [BLOCK_M, D]
    r_off = (b * (HKV * G) + heads).to(tl.int64) * T + tpos  # row of contiguous [B, Hq, T, *]
    do_s = tl.load(DOS + r_off[:, None] * D + dd[None, :], mask=row_ok[:, None], other=0.0)
    l2_s = tl.load(LS + r_off, mask=row_ok, other=0.0)
    delta_s = tl.load(DS + r_off, mask=row_ok, other=0.0)
    if DQ_INIT:
        dq = tl.load(DQ_ACC + r_off[:, None] * D + dd[None, :], mask=row_ok[:, None], other=0.0)
    else:
        dq = tl.zeros([BLOCK_M, D], tl.float32)

    kv_row = (b * HKV + g).to(tl.int64) * T  # first row of this group in contiguous [B, Hkv, T, D] grads
    u_base = b.to(tl.int64) * sub + g.to(tl.int64) * suh + tile.to(tl.int64) * sut
    n_union = 0
    if SPARSE:
        n_union = tl.load(COUNT + (b * HKV + g) * tl.cdiv(T, M_TOK) + tile)
    ks_base = KS + b.to(tl.int64) * sksb + g.to(tl.int64) * sksh
    vs_base = VS + b.to(tl.int64) * svsb + g.to(tl.int64) * svsh
    for u in range(0, n_union):
        j = tl.load(UNION + u_base + u)
        bits = tl.load(BITS + u_base + u)
        kpos, k, v = kv_block(ks_base, vs_base, j, skst, svst, T, BLOCK_N, D)
        ok = (row_member(bits, row_tok) & row_ok)[:, None] & (kpos[None, :] <= tpos[:, None])
        ds, p = _block_grads(q, do_s, k, v, ok, l2_s, delta_s, qk_scale2, cap2, SOFTCAP)
        dq += tl.dot(ds.to(k.dtype), k)
        if ATOMIC_KV:
            g_off = (kv_row + kpos)[:, None] * D + dd[None, :]
            kmask = (kpos < T)[:, None]
            tl.atomic_add(DKS + g_off, tl.dot(tl.trans(ds.to(q.dtype)), q) * scale, mask=kmask)
            tl.atomic_add(DVS + g_off, tl.dot(tl.trans(p.to(do_s.dtype)), do_s), mask=kmask)

    if HAS_SWA:
        if MERGE:
            do_w = do_s
            l2_w = l2_s
            delta_w = delta_s
            sel = row_selection(IDX, b, g, tpos, row_ok, sib, sih, sit, NSEL, NSEL_P2)
        else:
            do_w = tl.load(DOW + r_off[:, None] * D + dd[None, :], mask=row_ok[:, None], other=0.0)
            l2_w = tl.load(LW + r_off, mask=row_ok, other=0.0)
            delta_w = tl.load(DW + r_off, mask=row_ok, other=0.0)
        ko_base = KO + b.to(tl.int64) * skob + g.to(tl.int64) * skoh
        vo_base = VO + b.to(tl.int64) * svob + g.to(tl.int64) * svoh
        lo, hi = window_blocks(t0, T, window, M_TOK, BLOCK_N)
        for j in range(lo, hi + 1):
            kpos, k, v = kv_block(ko_base, vo_base, j, skot, svot, T, BLOCK_N, D)
            ok = in_window(kpos, tpos, row_ok, window)
            if MERGE:
                ok = ok & (~row_selected(sel, j))[:, None]
            ds, p = _block_grads(q, do_w, k, v, ok, l2_w, delta_w, qk_scale2, cap2, SOFTCAP)
            dq += tl.dot(ds.to(k.dtype), k)
            if ATOMIC_KV:
                g_off = (kv_row + kpos)[:, None] * D + dd[None, :]
                kmask = (kpos < T)[:, None]
                tl.atomic_add(DKO + g_off, tl.dot(tl.trans(ds.to(q.dtype)), q) * scale, mask=kmask)
                tl.atomic_add(DVO + g_off, tl.dot(tl.trans(p.to(do_w.dtype)), do_w), mask=kmask)

    tl.store(DQ + row_offsets(b, heads, tpos, sdqb, sdqh, sdqt, 1, D), (dq * scale).to(DQ.dtype.element_ty),
             mask=row_ok[:, None])


@triton.jit
def _tile_rows(tile, b, g, HKV, T, Q, sqb, sqh, sqt, DO, L2, DELTA,
               G: tl.constexpr, M_TOK: tl.constexpr, BLOCK_M: tl.constexpr, D: tl.constexpr):
    """Rows of query tile `tile`: (q, do, l2, delta, token positions, row validity, row token in tile)."""
    rows = tl.arange(0, BLOCK_M)
    row_tok = rows // G
    heads = g * G + rows % G
    tpos = tile * M_TOK + row_tok
    row_ok = (rows < M_TOK * G) & (tpos < T)
    dd = tl.arange(0, D)
    q_off = b.to(tl.int64) * sqb + heads.to(tl.int64) * sqh + tpos.to(tl.int64) * sqt
    q = tl.load(Q + q_off[:, None] + dd[None, :], mask=row_ok[:, None], other=0.0)
    r_off = (b * (HKV * G) + heads).to(tl.int64) * T + tpos
    do = tl.load(DO + r_off[:, None] * D + dd[None, :], mask=row_ok[:, None], other=0.0)
    l2 = tl.load(L2 + r_off, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + r_off, mask=row_ok, other=0.0)
    return q, do, l2, delta, tpos, row_ok, row_tok


@triton.jit
def _sparse_bwd_dkdv_kernel(
    Q, KS, VS, KO, VO, DOS, DOW, LS, LW, DS, DW, TILE_OF, BITS_OF, START, IDX,
    DKS, DVS, DKO, DVO,
    sqb, sqh, sqt, sksb, sksh, skst, svsb, svsh, svst, skob, skoh, skot, svob, svoh, svot, sib, sih, sit,
    sdksb, sdksh, sdkst, sdvsb, sdvsh, sdvst, sdkob, sdkoh, sdkot, sdvob, sdvoh, sdvot,
    T, HKV, NSEL, qk_scale2, scale, cap2, window,
    G: tl.constexpr, M_TOK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    NSEL_P2: tl.constexpr, MERGE: tl.constexpr, HAS_SWA: tl.constexpr, SPARSE: tl.constexpr, SOFTCAP: tl.constexpr,
):
    """dK, dV of key block j of one KV group, written once: shared K/V from the query tiles whose union holds j
    (the inverse of the tile unions, CSR in TILE_OF/BITS_OF/START), own K/V from the tiles whose window covers j.
    SPARSE=False: only the window part (the sparse branch is done block-major). Each gradient is written with its own
    strides (sd*: the layout of the K/V it belongs to, so the op returns it without a copy)."""
    j = tl.program_id(0)
    bg = tl.program_id(1)
    b = bg // HKV
    g = bg % HKV
    kpos = j * BLOCK_N + tl.arange(0, BLOCK_N)
    kmask = (kpos < T)[:, None]
    if SPARSE:
        _, k, v = kv_block(KS + b.to(tl.int64) * sksb + g.to(tl.int64) * sksh,
                            VS + b.to(tl.int64) * svsb + g.to(tl.int64) * svsh, j, skst, svst, T, BLOCK_N, D)
        dk = tl.zeros([BLOCK_N, D], tl.float32)
        dv = tl.zeros([BLOCK_N, D], tl.float32)
        n_blocks = tl.cdiv(T, BLOCK_N)
        e0 = tl.load(START + bg * n_blocks + j)
        e1 = tl.load(START + bg * n_blocks + j + 1)
        for e in range(e0, e1):
            tile = tl.load(TILE_OF + e)
            bits = tl.load(BITS_OF + e)
            q, do, l2, delta, tpos, row_ok, row_tok = _tile_rows(tile, b, g, HKV, T, Q, sqb, sqh, sqt, DOS, LS, DS,
                                                                 G, M_TOK, BLOCK_M, D)
            ok = (row_member(bits, row_tok) & row_ok)[:, None] & (kpos[None, :] <= tpos[:, None])
            ds, p = _block_grads(q, do, k, v, ok, l2, delta, qk_scale2, cap2, SOFTCAP)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do)
        tl.store(DKS + row_offsets(b, g, kpos, sdksb, sdksh, sdkst, 1, D), (dk * scale).to(DKS.dtype.element_ty),
                 mask=kmask)
        tl.store(DVS + row_offsets(b, g, kpos, sdvsb, sdvsh, sdvst, 1, D), dv.to(DVS.dtype.element_ty), mask=kmask)
    if HAS_SWA:
        _, k, v = kv_block(KO + b.to(tl.int64) * skob + g.to(tl.int64) * skoh,
                            VO + b.to(tl.int64) * svob + g.to(tl.int64) * svoh, j, skot, svot, T, BLOCK_N, D)
        dk = tl.zeros([BLOCK_N, D], tl.float32)
        dv = tl.zeros([BLOCK_N, D], tl.float32)
        tile_lo = (j * BLOCK_N) // M_TOK
        tile_hi = tl.minimum(j * BLOCK_N + BLOCK_N - 1 + window - 1, T - 1) // M_TOK
        for tile in range(tile_lo, tile_hi + 1):
            if MERGE:
                q, do, l2, delta, tpos, row_ok, row_tok = _tile_rows(tile, b, g, HKV, T, Q, sqb, sqh, sqt, DOS, LS,
                                                                     DS, G, M_TOK, BLOCK_M, D)
                sel = row_selection(IDX, b, g, tpos, row_ok, sib, sih, sit, NSEL, NSEL_P2)
                row_ok = row_ok & ~row_selected(sel, j)
            else:
                q, do, l2, delta, tpos, row_ok, row_tok = _tile_rows(tile, b, g, HKV, T, Q, sqb, sqh, sqt, DOW, LW,
                                                                     DW, G, M_TOK, BLOCK_M, D)
            ok = in_window(kpos, tpos, row_ok, window)
            ds, p = _block_grads(q, do, k, v, ok, l2, delta, qk_scale2, cap2, SOFTCAP)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do)
        tl.store(DKO + row_offsets(b, g, kpos, sdkob, sdkoh, sdkot, 1, D), (dk * scale).to(DKO.dtype.element_ty),
                 mask=kmask)
        tl.store(DVO + row_offsets(b, g, kpos, sdvob, sdvoh, sdvot, 1, D), dv.to(DVO.dtype.element_ty), mask=kmask)


def kv_grad_strides(*grads):
    """(batch, head, token) strides of each K/V gradient, in order, for the dK/dV kernel's stores."""
    return tuple(s for g in grads for s in g.stride()[:3])


def inverse_union(union, bits, count, n_blocks):
    """CSR of the query tiles that read each key block: (tile_of [E] int32, bits_of [E] int64, start
    [B*Hkv*n_blocks + 1] int32), entries of block (b, g, j) at start[(b*Hkv+g)*n_blocks + j] .. next start.

    No host sync (a boolean-mask compaction or `bincount` would wait for the GPU, which then idles while the rest of
    the backward is launched): the unused union slots get the key `B*Hkv*n_blocks` and sort last, so E is the full
    union size and only the first `start[-1]` entries are read."""
    B, Hkv, n_tiles, U = union.shape
    n_keys = B * Hkv * n_blocks
    valid = torch.arange(U, device=union.device) < count[..., None]  # [B, Hkv, nT, U]
    bg = torch.arange(B * Hkv, device=union.device).view(B, Hkv, 1, 1)
    key = torch.where(valid, bg * n_blocks + union.long(), n_keys).flatten()
    key, order = torch.sort(key, stable=True)
    start = torch.searchsorted(key, torch.arange(n_keys + 1, device=union.device)).to(torch.int32)
    tile = torch.arange(n_tiles, device=union.device, dtype=torch.int32).view(1, 1, n_tiles, 1).expand_as(union)
    return tile.flatten()[order].contiguous(), bits.flatten()[order].contiguous(), start


@triton.jit
def _store_gate_grad(DG, dout, o, b, h, t, sb, sh, st, sd, ok, MODE: tl.constexpr, D: tl.constexpr):
    """A branch's gate gradient at its own strides: dout * o per channel (MODE 2), summed over d per head (1)."""
    if MODE == 2:
        tl.store(DG + row_offsets(b, h, t, sb, sh, st, sd, D), (dout * o).to(DG.dtype.element_ty), mask=ok[:, None])
    else:
        tl.store(DG + b * sb + h * sh + t * st, tl.sum(dout * o, axis=1).to(DG.dtype.element_ty), mask=ok)


@triton.jit
def _bwd_preprocess_kernel(
    DOUT, BR, GS, GW, DOS, DOW, DELTA_S, DELTA_W, DGS, DGW,
    sdob, sdoh, sdot, sgsb, sgsh, sgst, sgsd, sgwb, sgwh, sgwt, sgwd,
    sdgsb, sdgsh, sdgst, sdgsd, sdgwb, sdgwh, sdgwt, sdgwd,
    n_rows, T, HQ,
    D: tl.constexpr, BLOCK_R: tl.constexpr, GS_MODE: tl.constexpr, GW_MODE: tl.constexpr,
):
    """Per row of [B, Hq, T]: do_branch = dout * gate, delta = do_branch . o_branch, dgate = dout * o_branch
    (summed over d for per-head gates). One pass over dout and the saved branch outputs. dout is read and the gate
    gradients written with their own strides (autograd's layout in, the gates' out: no copy either side); the rows
    it writes for the kernels after it (do_*, delta_*) are contiguous [B, Hq, T, *]."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = r < n_rows
    rr = r.to(tl.int64)
    dd = tl.arange(0, D)
    t = rr % T
    bh = rr // T
    h = bh % HQ
    b = bh // HQ
    off = rr[:, None] * D + dd[None, :]
    dout = tl.load(DOUT + row_offsets(b, h, t, sdob, sdoh, sdot, 1, D), mask=ok[:, None], other=0.0).to(tl.float32)
    o_s = tl.load(BR + off, mask=ok[:, None], other=0.0).to(tl.float32)
    o_w = tl.load(BR + n_rows.to(tl.int64) * D + off, mask=ok[:, None], other=0.0).to(tl.float32)
    do_s = dout
    if GS_MODE > 0:
        _store_gate_grad(DGS, dout, o_s, b, h, t, sdgsb, sdgsh, sdgst, sdgsd, ok, GS_MODE, D)
        g_off = gate_offsets(b, h, t, sgsb, sgsh, sgst, sgsd, GS_MODE, D)
        do_s = dout * tl.load(GS + g_off, mask=ok[:, None], other=0.0).to(tl.float32)
    do_w = dout
    if GW_MODE > 0:
        _store_gate_grad(DGW, dout, o_w, b, h, t, sdgwb, sdgwh, sdgwt, sdgwd, ok, GW_MODE, D)
        g_off = gate_offsets(b, h, t, sgwb, sgwh, sgwt, sgwd, GW_MODE, D)
        do_w = dout * tl.load(GW + g_off, mask=ok[:, None], other=0.0).to(tl.float32)
    tl.store(DOS + off, do_s.to(DOS.dtype.element_ty), mask=ok[:, None])
    tl.store(DOW + off, do_w.to(DOW.dtype.element_ty), mask=ok[:, None])
    tl.store(DELTA_S + rr, tl.sum(do_s * o_s, axis=1), mask=ok)
    tl.store(DELTA_W + rr, tl.sum(do_w * o_w, axis=1), mask=ok)


BWD_AUTO_MIN_T = 4096  # "auto": block-major backward from this length on (2048 at G >= 16)


def choose_backward_order(T, G):
    """"block" or "token" for the backward. Unlike the forward (whose block-major path pays per-(row, slot)
    partials), the block-major backward writes nothing per slot. Measured on an H200 (`bench/tune_block_bwd.py`,
    docs/kernels_sparse.md), block-major was faster at every T >= 4096 for G = 4 and 16, random and tile-correlated
    selections alike (32k, 32/8/128: 10.0 vs 45.2 ms random, 10.1 vs 12.9 ms tile), and at T = 2048 for G = 16
    (1.07 vs 1.72 ms) but not G = 4 (1.03 vs 0.88 ms). So the rule is on T and G alone: no union sizes, no host
    sync."""
    return "block" if T >= BWD_AUTO_MIN_T or (G >= 16 and T >= BWD_AUTO_MIN_T // 2) else "token"


def _block_major_bwd(q, k_own, v_own, k_shared, v_shared, rows, indices, dq, strides, meta, block_size, window,
                     scale, knobs, softcap=0.0):
    """order="block": the sparse branch block-major (`block_major.block_grads`, fp32 dq/dK/dV sums), then the
    token-major kernels for the SWA branch only; the dq kernel adds the block-major sum and writes dq once.
    Returns (dq, dk_own, dv_own, dk_shared, dv_shared)."""
    B, Hq, T, D = q.shape
    Hkv = k_shared.shape[1]
    nsel = indices.shape[-1]
    do_s, do_w, l2_s, l2_w, delta_s, delta_w = rows
    dq_acc = torch.zeros(B, Hq, T, D, device=q.device, dtype=torch.float32)
    dk_s, dv_s = (torch.zeros(B, Hkv, T, D, device=q.device, dtype=torch.float32) for _ in range(2))
    block_grads(q, k_shared, v_shared, do_s, l2_s, delta_s, indices, block_size, scale, dq_acc, dk_s, dv_s,
                softcap=softcap, **(knobs or {}))
    cap2 = softcap2(softcap)
    dk_o, dv_o = layout_like(k_own), layout_like(v_own)
    if window <= 0:  # no SWA branch: the own K/V get zero gradients
        dk_o.zero_(), dv_o.zero_()
    unused = indices  # union/inverse-union arguments of the token-major kernels, not read with SPARSE=False
    _sparse_bwd_kernel[(triton.cdiv(T, meta["M_TOK"]), B * Hkv)](
        q, k_shared, v_shared, k_own, v_own, *rows, unused, unused, unused, indices,
        dq_acc, dq, dk_s, dv_s, dk_o, dv_o, *strides, *dq.stride()[:3], *indices.stride()[:3],
        *indices.stride()[:3], T, Hkv, nsel, scale * LOG2E, scale, cap2, window, ATOMIC_KV=False, SPARSE=False,
        DQ_INIT=True, **meta)
    del dq_acc
    if window > 0:
        _sparse_bwd_dkdv_kernel[(triton.cdiv(T, block_size), B * Hkv)](
            q, k_shared, v_shared, k_own, v_own, *rows, unused, unused, unused, indices,
            dk_s, dv_s, dk_o, dv_o, *strides, *indices.stride()[:3], *kv_grad_strides(dk_s, dv_s, dk_o, dv_o),
            T, Hkv, nsel, scale * LOG2E, scale, cap2, window, SPARSE=False, **meta)
    return dq, dk_o, dv_o, layout_like(k_shared).copy_(dk_s), layout_like(v_shared).copy_(dv_s)


def sparse_attention_bwd(dout, q, k_own, v_own, k_shared, v_shared, indices, gate_sparse, gate_swa, sinks,
                         out, lse, branch_out, block_size, window, scale, merge, m_tok=None, kv_mode="kv_major",
                         num_warps=None, num_stages=None, order=None, block_major=None, *, softcap=0.0):
    """Gradients of `sparse_attention_fwd`.

    dout [B, Hq, T, d]; the rest as the forward, with its out, lse [B, Hq, T, 2] and branch_out [2, B, Hq, T, d]
    (recomputed when empty). Returns (dq, dk_own, dv_own, dk_shared, dv_shared, dgate_sparse, dgate_swa, dsinks);
    gate/sink gradients are None when absent. When k_own is k_shared the two gradients are still separate (the
    caller sums them); with merge every key gradient is in dk_shared/dv_shared and dk_own/dv_own are zeros.
    kv_mode: "kv_major" (default: one program per key block writes its dK/dV once, from the inverse of the tile
    unions; deterministic) or "atomic" (the dq pass also adds dK/dV with fp32 atomics).
    order (None = the forward's DEFAULT_ORDER, see `sparse_attention.forward_order`): loop order of the sparse
    branch. "token": the kernels above walk the tile unions. "block": K/V-block-major (`block_major.block_grads`:
    each selected block loaded once for the tokens that picked it, dq by fp32 atomics), then the token-major kernels
    for the SWA branch only. "auto": `choose_backward_order`. merge, kv_mode="atomic" and
    `torch.use_deterministic_algorithms(True)` run token-major (block-major's fp32 atomics make the summation
    order, so the last bits of dq/dK/dV, vary from run to run).
    `block_major`: knobs of `block_grads` (tok, chunk, num_warps, num_stages). softcap: as the forward's.
    """
    B, Hq, T, D = q.shape
    Hkv = k_shared.shape[1]
    G = Hq // Hkv
    nsel = indices.shape[-1]
    cap2 = softcap2(softcap)
    if branch_out is None or branch_out.numel() == 0:  # recompute (the forward's out is dropped at once)
        lse, branch_out = sparse_attention_fwd(q, k_own, v_own, k_shared, v_shared, indices, gate_sparse, gate_swa,
                                               sinks, block_size, window, scale, merge, True, softcap=softcap)[1:]
    dout, branch_out = last_dim_unit(dout), branch_out.contiguous()
    # every gradient this returns is allocated in its input's layout (`layout_like`), so the op hands it on as it is
    dgate_sparse = None if gate_sparse is None else layout_like(gate_sparse)
    dgate_swa = None if gate_swa is None else layout_like(gate_swa)
    gate_sparse, gate_swa = last_dim_unit(gate_sparse), last_dim_unit(gate_swa)
    n_rows = B * Hq * T
    do_s = torch.empty(B, Hq, T, D, device=q.device, dtype=q.dtype)  # dout * gate_sparse
    do_w = torch.empty_like(do_s)
    delta_s = torch.empty(B, Hq, T, device=q.device, dtype=torch.float32)  # do_s . o_sparse
    delta_w = torch.empty_like(delta_s)
    block_r = 32
    _bwd_preprocess_kernel[(triton.cdiv(n_rows, block_r),)](
        dout, branch_out, gate_sparse if gate_sparse is not None else dout, gate_swa if gate_swa is not None else dout,
        do_s, do_w, delta_s, delta_w, dgate_sparse if gate_sparse is not None else dout,
        dgate_swa if gate_swa is not None else dout,
        *dout.stride()[:3], *gate_strides(gate_sparse), *gate_strides(gate_swa), *gate_strides(dgate_sparse),
        *gate_strides(dgate_swa), n_rows, T, Hq,
        D=D, BLOCK_R=block_r, GS_MODE=gate_mode(gate_sparse), GW_MODE=gate_mode(gate_swa), num_warps=4)
    del dout, branch_out  # read once, above: a recomputed branch_out (2 [B, Hq, T, d]) is freed before the kernels
    lse_s, lse_w = lse[..., 0], lse[..., 1]
    dsinks = None
    if sinks is not None:
        sink = sinks.float()[None, :, None]
        lse_s, lse_w = torch.logaddexp(lse_s, sink), torch.logaddexp(lse_w, sink)
        dsinks = -((torch.exp(sink - lse_s) * delta_s).sum((0, 2)) + (torch.exp(sink - lse_w) * delta_w).sum((0, 2)))
        dsinks = dsinks.to(sinks.dtype)
    l2_s = torch.nan_to_num(lse_s, neginf=0.0).mul(LOG2E).contiguous()  # no key: every p is masked anyway
    l2_w = torch.nan_to_num(lse_w, neginf=0.0).mul(LOG2E).contiguous()

    q_in, k_own_in, v_own_in, k_shared_in, v_shared_in = q, k_own, v_own, k_shared, v_shared
    if merge:  # the window is read from k_shared/v_shared (see the forward)
        k_own, v_own = k_shared, v_shared
    q, k_own, v_own, k_shared, v_shared = (last_dim_unit(x) for x in (q, k_own, v_own, k_shared, v_shared))
    indices = indices.contiguous()
    m_tok, block_m, num_warps, num_stages = launch_config(G, D, block_size, m_tok, num_warps, num_stages or 2)
    atomic = kv_mode == "atomic"
    order = order or fwd.DEFAULT_ORDER
    assert order in ("token", "block", "auto"), order
    if merge or atomic or torch.are_deterministic_algorithms_enabled():
        order = "token"
    if order == "auto":
        order = choose_backward_order(T, G)
    dq = layout_like(q_in)
    strides = (*q.stride()[:3], *k_shared.stride()[:3], *v_shared.stride()[:3], *k_own.stride()[:3],
               *v_own.stride()[:3])
    meta = dict(G=G, M_TOK=m_tok, BLOCK_M=block_m, BLOCK_N=block_size, D=D, NSEL_P2=triton.next_power_of_2(nsel),
                MERGE=bool(merge), HAS_SWA=window > 0, SOFTCAP=bool(softcap), num_warps=num_warps,
                num_stages=num_stages)
    rows = (do_s, do_w, l2_s, l2_w, delta_s, delta_w)
    if order == "block":
        grads = _block_major_bwd(q, k_own, v_own, k_shared, v_shared, rows, indices, dq, strides, meta, block_size,
                                 window, scale, block_major, softcap)
        return (*grads, dgate_sparse, dgate_swa, dsinks)
    union, bits, count = tile_block_union(indices, m_tok)
    refs = (k_shared_in, v_shared_in, k_own_in, v_own_in)
    if atomic:  # fp32 sums, contiguous (the atomics' offsets), cast into the K/V layouts below
        dk_s, dv_s, dk_o, dv_o = (torch.zeros(B, Hkv, T, D, device=q.device, dtype=torch.float32) for _ in range(4))
    else:  # kv_major writes each block once, in place
        dk_s, dv_s, dk_o, dv_o = (layout_like(x) for x in refs)
    _sparse_bwd_kernel[(triton.cdiv(T, m_tok), B * Hkv)](
        q, k_shared, v_shared, k_own, v_own, *rows, union, bits, count, indices,
        dq, dq, dk_s, dv_s, dk_o, dv_o, *strides, *dq.stride()[:3], *union.stride()[:3], *indices.stride()[:3],
        T, Hkv, nsel, scale * LOG2E, scale, cap2, window, ATOMIC_KV=atomic, SPARSE=True, DQ_INIT=False,
        **meta)
    if atomic:
        dk_s, dv_s, dk_o, dv_o = (layout_like(ref).copy_(x) for ref, x in zip(refs, (dk_s, dv_s, dk_o, dv_o)))
    else:
        n_blocks = triton.cdiv(T, block_size)
        tile_of, bits_of, start = inverse_union(union, bits, count, n_blocks)
        _sparse_bwd_dkdv_kernel[(n_blocks, B * Hkv)](
            q, k_shared, v_shared, k_own, v_own, *rows, tile_of, bits_of, start, indices, dk_s, dv_s, dk_o, dv_o,
            *strides, *indices.stride()[:3], *kv_grad_strides(dk_s, dv_s, dk_o, dv_o),
            T, Hkv, nsel, scale * LOG2E, scale, cap2, window, SPARSE=True, **meta)
        if window <= 0:
            dk_o.zero_(), dv_o.zero_()
    if merge:  # every key gradient belongs to k_shared/v_shared; k_own/v_own are not read (zeros, as the reference)
        dk_s, dv_s = dk_s.add_(dk_o), dv_s.add_(dv_o)
        dk_o, dv_o = torch.zeros_like(k_own_in), torch.zeros_like(v_own_in)
    return (dq, dk_o, dv_o, dk_s, dv_s, dgate_sparse, dgate_swa, dsinks)


__all__ = ["sparse_attention_bwd", "choose_backward_order"]
