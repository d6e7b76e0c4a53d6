"""Triton forward of the sparse-layer op (`hysparse::sparse_attention`): sparse branch + SWA branch in one kernel.

One program owns a tile of `m_tok` consecutive tokens of one KV group; its rows are those tokens times the G query
heads of the group (`m_tok * G` rows, about 64), so every K/V block it loads serves all of them. The sparse branch
walks the sorted union of the tile's selected blocks (`block_union.tile_block_union`) and masks, per row, the blocks
that row's token did not select and the keys after it; the SWA branch then walks the few own-K/V blocks that cover
`[t0 - window + 1, t0 + m_tok - 1]`. Each branch keeps its own online softmax; the per-head sink logit joins each
denominator; gates are applied in the epilogue and `out` is written once. `merge=True` runs one softmax over the
selected blocks and the window keys not already selected (the window walk skips selected blocks per row).
`SOFTCAP` (constexpr) caps both branches' logits; a launch without it compiles the arithmetic it always had.
`launch_forward` is the token-major kernel's public launcher: the eager function below and the AOTInductor
`triton_op` (export/aoti_triton.py) both call it.

Semantics and shapes: docs/design.md (backend interface); design notes and numbers: docs/kernels_sparse.md.
"""

import contextlib

import torch
import triton
import triton.language as tl

from .block_major import block_partials, chunk_lists, combine_partials
from .block_union import choose_tokens_per_tile, tile_block_union, tokens_per_tile
from .common import (INTERPRET, LN2_C, LOG2E, LOG2E_C, capturing, descriptor, direct, soft_cap, softcap2, timed_at,
                     tma_mode, with_descriptors)
from .online_softmax import normalize_with_sink, online_softmax_step


@triton.jit
def row_member(bits, row_tok):
    """Rows whose token has bit `row_tok` set in the tile-union membership word `bits`."""
    return ((bits >> row_tok.to(tl.int64)) & 1) != 0


@triton.jit
def row_selected(sel, j):
    """[M] rows whose selection list `sel [M, NSEL]` contains block `j`."""
    return tl.sum((sel == j).to(tl.int32), axis=1) > 0


@triton.jit
def row_selection(IDX, b, g, tpos, row_ok, sib, sih, sit, NSEL, NSEL_P2: tl.constexpr):
    """[M, NSEL_P2] the selected blocks of each row's token (-1 padded)."""
    i_off = b.to(tl.int64) * sib + g.to(tl.int64) * sih + tpos.to(tl.int64) * sit
    slots = tl.arange(0, NSEL_P2)
    return tl.load(IDX + i_off[:, None] + slots[None, :], mask=row_ok[:, None] & (slots[None, :] < NSEL), other=-1)


@triton.jit
def kv_block(k_base, v_base, j, skt, svt, T, BLOCK_N: tl.constexpr, D: tl.constexpr):
    """Key block j of one KV head: positions [BLOCK_N] and k, v [BLOCK_N, D] (zeros past T)."""
    kpos = j * BLOCK_N + tl.arange(0, BLOCK_N)
    kmask = (kpos < T)[:, None]
    dd = tl.arange(0, D)
    k = tl.load(k_base + kpos.to(tl.int64)[:, None] * skt + dd[None, :], mask=kmask, other=0.0)
    v = tl.load(v_base + kpos.to(tl.int64)[:, None] * svt + dd[None, :], mask=kmask, other=0.0)
    return kpos, k, v


@triton.jit
def kv_block_desc(KD, VD, b, g, j, T, HKV, MODE: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr):
    """Key block j of KV head (b, g) through tensor descriptors (Hopper bulk copies; `common.descriptor`) over K/V
    [B, Hkv, T, d]: MODE 1 4-D, 2 contiguous rows (b, g, t), 3 the model's [B, T, Hkv, d] rows. Returns positions
    [BLOCK_N] and k, v [BLOCK_N, D]; V rows past T are zeros, as `kv_block`'s masked loads give them (4-D: the
    bulk copy's fill; 2-D: they are the next head's or batch row's, masked here; K's are masked by the caller's
    causal mask)."""
    kpos = j * BLOCK_N + tl.arange(0, BLOCK_N)
    if MODE == 1:
        k = KD.load([b, g, j * BLOCK_N, 0]).reshape(BLOCK_N, D)  # b, g, j: int32 (the descriptor's offsets)
        v = VD.load([b, g, j * BLOCK_N, 0]).reshape(BLOCK_N, D)
    else:
        if MODE == 2:
            row = (b * HKV + g) * T + j * BLOCK_N
            col = 0
        else:
            row = b * T + j * BLOCK_N
            col = g * D
        k = KD.load([row, col])
        v = tl.where((kpos < T)[:, None], VD.load([row, col]), 0.0)
    return kpos, k, v


@triton.jit
def window_blocks(t0, T, window, M_TOK: tl.constexpr, BLOCK_N: tl.constexpr):
    """First and last own-K/V block that the SWA windows of tokens t0 .. t0 + M_TOK - 1 reach."""
    return tl.maximum(t0 - window + 1, 0) // BLOCK_N, tl.minimum(t0 + M_TOK - 1, T - 1) // BLOCK_N


@triton.jit
def in_window(kpos, tpos, row_ok, window):
    """[M, BLOCK_N] keys at or before each row's token and within its last `window` positions."""
    return row_ok[:, None] & (kpos[None, :] <= tpos[:, None]) & (kpos[None, :] > tpos[:, None] - window)


@triton.jit
def row_offsets(b, heads, tpos, sb, sh, st, sd, D: tl.constexpr):
    """[M, D] element offsets of rows (b, heads, tpos) of a [B, H, T, D] tensor with strides (sb, sh, st, sd)."""
    off = b.to(tl.int64) * sb + heads.to(tl.int64) * sh + tpos.to(tl.int64) * st
    return off[:, None] + tl.arange(0, D)[None, :] * sd


@triton.jit
def gate_offsets(b, heads, tpos, sgb, sgh, sgt, sgd, MODE: tl.constexpr, D: tl.constexpr):
    """[M, D] element offsets of a gate's rows: per channel (MODE 2) or one value per head, repeated over d (1)."""
    if MODE == 2:
        step = sgd
    else:
        step = 0
    return row_offsets(b, heads, tpos, sgb, sgh, sgt, step, D)


@triton.jit
def union_walk(q, m_s, l_s, acc_s, UNION, BITS, u_base, n_union, ks_base, vs_base, skst, svst, n_keys, row_tok,
               row_ok, qpos, qk_scale2, cap2, b, g, HKV, BLOCK_N: tl.constexpr, D: tl.constexpr,
               SOFTCAP: tl.constexpr, TMA: tl.constexpr):
    """Sparse branch of a token tile, one union block per step: block j = UNION[u_base + u] of the shared K/V
    (keys < n_keys), kept for the rows whose token's bit is set in BITS[u_base + u] and whose position `qpos` is at or
    after the key. Folds each step into the online-softmax state (m_s, l_s, acc_s) and returns it. TMA: ks_base and
    vs_base are tensor descriptors over the whole [B, Hkv, T, d] K/V (of exactly n_keys rows; TMA is the mode of
    `kv_block_desc`), read at head (b, g)."""
    for u in range(0, n_union):
        j = tl.load(UNION + u_base + u)
        if TMA:
            kpos, k, v = kv_block_desc(ks_base, vs_base, b, g, j, n_keys, HKV, TMA, BLOCK_N, D)
        else:
            kpos, k, v = kv_block(ks_base, vs_base, j, skst, svst, n_keys, BLOCK_N, D)
        bits = tl.load(BITS + u_base + u)
        s = soft_cap(tl.dot(q, tl.trans(k)) * qk_scale2, cap2, SOFTCAP)  # [BLOCK_M, BLOCK_N], log2 domain
        ok = (row_member(bits, row_tok) & row_ok)[:, None] & (kpos[None, :] <= qpos[:, None])
        s = tl.where(ok, s, float("-inf"))
        m_s, l_s, acc_s = online_softmax_step(s, v, m_s, l_s, acc_s)
    return m_s, l_s, acc_s


@triton.jit
def _swa_branch(q, m_s, l_s, acc_s, KO, VO, IDX, b, g, t0, tpos, row_ok,
                skob, skoh, skot, svob, svoh, svot, sib, sih, sit, T, NSEL, qk_scale2, cap2, window, HKV,
                M_TOK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
                NSEL_P2: tl.constexpr, MERGE: tl.constexpr, HAS_SWA: tl.constexpr, SOFTCAP: tl.constexpr,
                TMA: tl.constexpr):
    """SWA branch (own K/V, positions t-window+1..t) of a tile; merged into the sparse softmax state when MERGE.
    TMA: KO and VO are tensor descriptors over the whole [B, Hkv, T, d] own K/V (`kv_block_desc`'s mode).

    Returns the sparse state (changed only when MERGE) and the SWA branch's (m_w, l_w, acc_w)."""
    m_w = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_w = tl.zeros([BLOCK_M], tl.float32)
    acc_w = tl.zeros([BLOCK_M, D], tl.float32)
    if HAS_SWA:
        if MERGE:
            sel = row_selection(IDX, b, g, tpos, row_ok, sib, sih, sit, NSEL, NSEL_P2)
        if not TMA:
            ko_base = KO + b.to(tl.int64) * skob + g.to(tl.int64) * skoh
            vo_base = VO + b.to(tl.int64) * svob + g.to(tl.int64) * svoh
        lo, hi = window_blocks(t0, T, window, M_TOK, BLOCK_N)
        for j in range(lo, hi + 1):
            if TMA:
                kpos, k, v = kv_block_desc(KO, VO, b, g, j, T, HKV, TMA, BLOCK_N, D)
            else:
                kpos, k, v = kv_block(ko_base, vo_base, j, skot, svot, T, BLOCK_N, D)
            s = soft_cap(tl.dot(q, tl.trans(k)) * qk_scale2, cap2, SOFTCAP)
            ok = in_window(kpos, tpos, row_ok, window)
            if MERGE:
                ok = ok & (~row_selected(sel, j))[:, None]
                s = tl.where(ok, s, float("-inf"))
                m_s, l_s, acc_s = online_softmax_step(s, v, m_s, l_s, acc_s)
            else:
                s = tl.where(ok, s, float("-inf"))
                m_w, l_w, acc_w = online_softmax_step(s, v, m_w, l_w, acc_w)
    return m_s, l_s, acc_s, m_w, l_w, acc_w


@triton.jit
def _epilogue(m_s, l_s, acc_s, m_w, l_w, acc_w, GS, GW, SINKS, OUT, LSE, BR, b, heads, tpos, row_ok,
              sgsb, sgsh, sgst, sgsd, sgwb, sgwh, sgwt, sgwd, sob, soh, sot, T, HKV,
              G: tl.constexpr, BLOCK_M: tl.constexpr, D: tl.constexpr, HAS_SINKS: tl.constexpr,
              GS_MODE: tl.constexpr, GW_MODE: tl.constexpr, SAVE: tl.constexpr):
    """Sinks join each branch's denominator, lse (and the ungated branches when SAVE) are stored, gates multiply,
    `out` is written once, with its own strides (so*: q's layout, which the op returns without a copy; lse and the
    branches are contiguous). Both kernels that call it run on a grid whose axis 1 is B * Hkv."""
    dd = tl.arange(0, D)
    if HAS_SINKS:
        sink2 = tl.load(SINKS + heads).to(tl.float32) * LOG2E_C
    else:
        sink2 = tl.full([BLOCK_M], float("-inf"), tl.float32)
    o_s = normalize_with_sink(m_s, l_s, acc_s, sink2)
    o_w = normalize_with_sink(m_w, l_w, acc_w, sink2)

    o_off = ((b * (HKV * G) + heads).to(tl.int64) * T + tpos)  # row of a contiguous [B, Hq, T, *] tensor
    lse_s = tl.where(l_s > 0, (m_s + tl.log2(l_s)) * LN2_C, float("-inf"))
    lse_w = tl.where(l_w > 0, (m_w + tl.log2(l_w)) * LN2_C, float("-inf"))
    tl.store(LSE + o_off * 2, lse_s, mask=row_ok)
    tl.store(LSE + o_off * 2 + 1, lse_w, mask=row_ok)
    if SAVE:
        n_rows = (tl.num_programs(1) * G).to(tl.int64) * T
        tl.store(BR + o_off[:, None] * D + dd[None, :], o_s.to(BR.dtype.element_ty), mask=row_ok[:, None])
        tl.store(BR + (n_rows + o_off)[:, None] * D + dd[None, :], o_w.to(BR.dtype.element_ty), mask=row_ok[:, None])
    if GS_MODE > 0:  # 1: per head [.., 1], 2: per channel [.., d]
        gs_off = gate_offsets(b, heads, tpos, sgsb, sgsh, sgst, sgsd, GS_MODE, D)
        o_s = o_s * tl.load(GS + gs_off, mask=row_ok[:, None], other=0.0).to(tl.float32)
    if GW_MODE > 0:
        gw_off = gate_offsets(b, heads, tpos, sgwb, sgwh, sgwt, sgwd, GW_MODE, D)
        o_w = o_w * tl.load(GW + gw_off, mask=row_ok[:, None], other=0.0).to(tl.float32)
    tl.store(OUT + row_offsets(b, heads, tpos, sob, soh, sot, 1, D), (o_s + o_w).to(OUT.dtype.element_ty),
             mask=row_ok[:, None])


@triton.jit
def _sparse_fwd_kernel(
    Q, KS, VS, KO, VO, UNION, BITS, COUNT, IDX, GS, GW, SINKS, OUT, LSE, BR,
    sqb, sqh, sqt, sksb, sksh, skst, svsb, svsh, svst, skob, skoh, skot, svob, svoh, svot,
    sub, suh, sut, sib, sih, sit,
    sgsb, sgsh, sgst, sgsd, sgwb, sgwh, sgwt, sgwd, sob, soh, sot,
    T, HKV, NSEL, qk_scale2, cap2, window,
    G: tl.constexpr, M_TOK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    NSEL_P2: tl.constexpr, MERGE: tl.constexpr, HAS_SWA: tl.constexpr, HAS_SINKS: tl.constexpr,
    GS_MODE: tl.constexpr, GW_MODE: tl.constexpr, SAVE: tl.constexpr, PAIR: tl.constexpr, SOFTCAP: tl.constexpr,
    TMA: tl.constexpr = 0,
):
    """Token-major sparse layer forward (module docstring). TMA (never with PAIR): 0 pointer loads; 1, 2, 3: KS, VS,
    KO, VO are tensor descriptors (`common.descriptor`'s modes: 4-D, contiguous 2-D, the model's layout 2-D); their
    strides are then unused."""
    qk_scale2 = tl.cast(qk_scale2, tl.float32)  # a traced caller (AOTInductor, wrap_triton) passes floats as fp64
    tile = tl.program_id(0)
    bg = tl.program_id(1)
    b = bg // HKV
    g = bg % HKV
    t0 = tile * M_TOK
    rows = tl.arange(0, BLOCK_M)
    row_tok = rows // G  # token of the row inside the tile
    heads = g * G + rows % G  # [BLOCK_M] query head of the row
    tpos = t0 + row_tok  # [BLOCK_M] token position
    row_ok = (rows < M_TOK * G) & (tpos < T)
    dd = tl.arange(0, D)

    q_off = b.to(tl.int64) * sqb + heads.to(tl.int64) * sqh + tpos.to(tl.int64) * sqt
    q = tl.load(Q + q_off[:, None] + dd[None, :], mask=row_ok[:, None], other=0.0)  # [BLOCK_M, D]

    # ---- sparse (or merged) branch over the union of the tile's selected blocks of the shared K/V
    m_s = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_s = tl.zeros([BLOCK_M], tl.float32)
    acc_s = tl.zeros([BLOCK_M, D], tl.float32)
    u_base = b.to(tl.int64) * sub + g.to(tl.int64) * suh + tile.to(tl.int64) * sut
    n_union = tl.load(COUNT + (b * HKV + g) * tl.cdiv(T, M_TOK) + tile)
    if TMA:
        ks_base = KS
        vs_base = VS
    else:
        ks_base = KS + b.to(tl.int64) * sksb + g.to(tl.int64) * sksh
        vs_base = VS + b.to(tl.int64) * svsb + g.to(tl.int64) * svsh
    if PAIR:  # two union blocks per step: [BLOCK_M, 2 * BLOCK_N] scores, half the softmax rescales per key
        cols2 = tl.arange(0, 2 * BLOCK_N)
        hi_half = cols2 >= BLOCK_N
        for u in range(0, n_union, 2):
            has1 = u + 1 < n_union
            j0 = tl.load(UNION + u_base + u)
            u1 = tl.minimum(u + 1, n_union - 1)
            j1 = tl.load(UNION + u_base + u1)
            bits0 = tl.load(BITS + u_base + u)
            bits1 = tl.where(has1, tl.load(BITS + u_base + u1), 0)  # no bit: the second half is masked
            kpos = tl.where(hi_half, j1 * BLOCK_N + cols2 - BLOCK_N, j0 * BLOCK_N + cols2)  # [2 * BLOCK_N]
            ld = ((kpos < T) & (cols2 < tl.minimum(n_union - u, 2) * BLOCK_N))[:, None]
            k = tl.load(ks_base + kpos.to(tl.int64)[:, None] * skst + dd[None, :], mask=ld, other=0.0)
            v = tl.load(vs_base + kpos.to(tl.int64)[:, None] * svst + dd[None, :], mask=ld, other=0.0)
            s = soft_cap(tl.dot(q, tl.trans(k)) * qk_scale2, cap2, SOFTCAP)
            mem0 = (row_member(bits0, row_tok) & row_ok)[:, None]
            mem1 = (row_member(bits1, row_tok) & row_ok)[:, None]
            ok = tl.where(hi_half[None, :], mem1, mem0) & (kpos[None, :] <= tpos[:, None])
            s = tl.where(ok, s, float("-inf"))
            m_s, l_s, acc_s = online_softmax_step(s, v, m_s, l_s, acc_s)
    else:
        m_s, l_s, acc_s = union_walk(q, m_s, l_s, acc_s, UNION, BITS, u_base, n_union, ks_base, vs_base, skst, svst,
                                     T, row_tok, row_ok, tpos, qk_scale2, cap2, b, g, HKV, BLOCK_N, D, SOFTCAP, TMA)

    m_s, l_s, acc_s, m_w, l_w, acc_w = _swa_branch(
        q, m_s, l_s, acc_s, KO, VO, IDX, b, g, t0, tpos, row_ok, skob, skoh, skot, svob, svoh, svot, sib, sih, sit,
        T, NSEL, qk_scale2, cap2, window, HKV, M_TOK, BLOCK_M, BLOCK_N, D, NSEL_P2, MERGE, HAS_SWA, SOFTCAP, TMA)
    _epilogue(m_s, l_s, acc_s, m_w, l_w, acc_w, GS, GW, SINKS, OUT, LSE, BR, b, heads, tpos, row_ok,
              sgsb, sgsh, sgst, sgsd, sgwb, sgwh, sgwt, sgwd, sob, soh, sot, T, HKV, G, BLOCK_M, D, HAS_SINKS, GS_MODE,
              GW_MODE, SAVE)


@triton.jit
def _sparse_fwd_partials_kernel(
    Q, KO, VO, OP, LP, IDX, GS, GW, SINKS, OUT, LSE, BR,
    sqb, sqh, sqt, skob, skoh, skot, svob, svoh, svot, sib, sih, sit,
    sgsb, sgsh, sgst, sgsd, sgwb, sgwh, sgwt, sgwd, sob, soh, sot,
    T, T_BEGIN, TC, HKV, NSEL, qk_scale2, cap2, window,
    G: tl.constexpr, M_TOK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    NSEL_P2: tl.constexpr, HAS_SWA: tl.constexpr, HAS_SINKS: tl.constexpr,
    GS_MODE: tl.constexpr, GW_MODE: tl.constexpr, SAVE: tl.constexpr, SOFTCAP: tl.constexpr,
    COMBINE: tl.constexpr = False,
):
    """Block-major path, last pass: the tile's rows take their combined sparse partial (`block_major.py`: slot 0 of
    the partial buffers after `combine_partials`) as the sparse branch's (m, l, acc) state, then run the SWA branch
    and the epilogue of `_sparse_fwd_kernel`. Tiles of the token chunk `T_BEGIN .. T_BEGIN + TC - 1` (TC a multiple of
    M_TOK except at the sequence end); the partial buffers hold that chunk only.

    COMBINE: no separate combine pass; the tile folds its rows' NSEL partials itself (FlashAttention-3's split
    combine: every slot's log2-sum-exp first, their max, then the partial outputs streamed, weighted
    2^(lse_s - max)), so the SWA branch is the last split of the same softmax state and the gates and sinks follow
    in the epilogue. Saves the combine's write of slot 0, this kernel's read of it and a launch."""
    tile = tl.program_id(0)
    bg = tl.program_id(1)
    b = bg // HKV
    g = bg % HKV
    t0 = T_BEGIN + tile * M_TOK
    rows = tl.arange(0, BLOCK_M)
    row_tok = rows // G
    hh = rows % G
    heads = g * G + hh
    tpos = t0 + row_tok
    row_ok = (rows < M_TOK * G) & (tpos < T_BEGIN + TC) & (tpos < T)
    dd = tl.arange(0, D)

    # ---- sparse branch from the combined partial (slot 0, `block_major.combine_partials`): normalized output o
    # and its log2-sum-exp lse, i.e. the state m = lse, l = 1, acc = o (m = -inf, l = 0 when no key was visible)
    prow = ((bg.to(tl.int64) * TC + (tpos - T_BEGIN)) * NSEL) * G + hh  # [BLOCK_M] slot 0 of each row
    if COMBINE:  # (m, l, acc) = (max_s lse_s, sum_s w_s, sum_s w_s o_s), w_s = 2^(lse_s - m): the online state
        m_s = tl.full([BLOCK_M], float("-inf"), tl.float32)
        for sl in range(0, NSEL):
            m_s = tl.maximum(m_s, tl.load(LP + prow + sl * G, mask=row_ok, other=float("-inf")))
        m_safe = tl.where(m_s == float("-inf"), 0.0, m_s)
        l_s = tl.zeros([BLOCK_M], tl.float32)
        acc_s = tl.zeros([BLOCK_M, D], tl.float32)
        for sl in range(0, NSEL):
            w = tl.exp2(tl.load(LP + prow + sl * G, mask=row_ok, other=float("-inf")) - m_safe)  # 0: empty slot
            # an empty slot's output was never written (any bits): loaded anyway, dropped by a select
            o = tl.load(OP + (prow + sl * G)[:, None] * D + dd[None, :], mask=row_ok[:, None], other=0.0,
                        eviction_policy="evict_first")
            l_s += w
            acc_s += tl.where((w > 0)[:, None], w[:, None] * o.to(tl.float32), 0.0)
    else:
        m_s = tl.load(LP + prow, mask=row_ok, other=float("-inf"))
        l_s = tl.where(m_s == float("-inf"), 0.0, 1.0)
        acc_s = tl.load(OP + prow[:, None] * D + dd[None, :], mask=(row_ok & (l_s > 0))[:, None],
                        other=0.0).to(tl.float32)

    q = tl.zeros([BLOCK_M, D], Q.dtype.element_ty)
    if HAS_SWA:
        q_off = b.to(tl.int64) * sqb + heads.to(tl.int64) * sqh + tpos.to(tl.int64) * sqt
        q = tl.load(Q + q_off[:, None] + dd[None, :], mask=row_ok[:, None], other=0.0)
    m_s, l_s, acc_s, m_w, l_w, acc_w = _swa_branch(
        q, m_s, l_s, acc_s, KO, VO, IDX, b, g, t0, tpos, row_ok, skob, skoh, skot, svob, svoh, svot, sib, sih, sit,
        T, NSEL, qk_scale2, cap2, window, HKV, M_TOK, BLOCK_M, BLOCK_N, D, NSEL_P2, False, HAS_SWA, SOFTCAP, 0)
    _epilogue(m_s, l_s, acc_s, m_w, l_w, acc_w, GS, GW, SINKS, OUT, LSE, BR, b, heads, tpos, row_ok,
              sgsb, sgsh, sgst, sgsd, sgwb, sgwh, sgwt, sgwd, sob, soh, sot, T, HKV, G, BLOCK_M, D, HAS_SINKS, GS_MODE,
              GW_MODE, SAVE)


def last_dim_unit(x):
    return x if x is None or x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def layout_like(x):
    """An empty tensor shaped as `x` in the layout `torch.empty_like(x)` gives it, the one the ops' fake
    implementations declare for outputs and gradients standing for `x` (`ops._layout_of`), so the op returns it
    without a copy; contiguous where that layout's last dimension is not unit-stride (the kernels' stores need it; a
    per-head gate's last dimension has size 1)."""
    y = torch.empty_like(x)
    return y if y.stride(-1) == 1 or x.shape[-1] == 1 else torch.empty(x.shape, device=x.device, dtype=x.dtype)


def gate_mode(gate):
    return 0 if gate is None else (2 if gate.shape[-1] > 1 else 1)


def gate_strides(gate):
    return (0, 0, 0, 0) if gate is None else tuple(gate.stride())


def launch_config(G, D, block_size, m_tok=None, num_warps=None, num_stages=None):
    """(m_tok, BLOCK_M, num_warps, num_stages) for a GQA group G; arguments that are not None override.

    Defaults from bench/tune_sparse_attention.py on an H100 (docs/kernels_sparse.md): ~64 rows, 4 warps, 3 stages;
    tiles of more than 64 rows get 8 warps (one warpgroup per 64 rows).
    """
    m_tok = m_tok or tokens_per_tile(G)
    block_m = max(16, triton.next_power_of_2(m_tok * G))
    num_warps = num_warps or (4 if block_m * max(D, block_size) <= 64 * 128 else 8)
    return m_tok, block_m, num_warps, num_stages or 3


DEFAULT_ORDER = "auto"  # what `sparse_attention_fwd(order=None)` (and so the op) runs; see `forward_order`
AUTO_UNION_RATIO = 4.0  # "auto": block-major when the mean tile union exceeds this many times nsel
AUTO_MIN_T = 16384  # "auto": token-major below this length (H200, 32/8/128 random: block 0.4x vs token 0.6x cuDNN at
#                     8k, 1.6x vs 1.1x at 32k; H100, 2026-12-06: 1.93 vs 1.28 ms at 8k, 3.74 vs 4.02 ms at 16k, and
#                     the model's 8k forward 1% slower with 4096; docs/benchmarks.md "Ninth session")
TOKEN_TMA = True  # token-major: K/V through tensor descriptors (False, True / "4d", "2d"; the `tma` knob): 4-D was
# 15-19% faster than pointer loads on the H100 at 32k (2-D 13% slower; docs/kernels_sparse.md), at block 64, head dim
TOKEN_TMA_TIMED = {(64, 128)}  # 128: the (block_size, head_dim) pairs where TOKEN_TMA applies (None: everywhere)
TMA_FAILED: dict = {}  # (device, dtype, head_dim, tiles, mode) -> why the descriptor kernel failed: pointer loads there
LAST_ORDER: dict = {}  # "auto": (device, work-list shape, nsel, T) -> the order last chosen there (graph captures)
MAX_PARTIAL_BYTES = 1 << 30  # block-major: partial buffers per token chunk (the sequence is cut to fit)
BLOCK_COMBINE = "separate"  # block-major: the combine kernel then the last kernel ("fused": the last kernel folds
#                             the partials itself; 0.1% / 3% faster on the H100 at 32k: below the model's noise)


@contextlib.contextmanager
def forward_order(order):
    """Within the block, `sparse_attention_fwd(order=None)` and `sparse_attention_bwd(order=None)` (so also
    `hysparse::sparse_attention`, its backward and the backward's recomputation) run `order` ("token", "block" or
    "auto"). For tests and benchmarks; not thread-safe."""
    global DEFAULT_ORDER
    assert order in ("token", "block", "auto"), order
    old, DEFAULT_ORDER = DEFAULT_ORDER, order
    try:
        yield
    finally:
        DEFAULT_ORDER = old


def choose_order(count, nsel, T, G=None):
    """"block" or "token" from the token-major work list (`count [B, Hkv, n_tiles]`, distinct blocks per tile).

    Token-major work is ~ the mean union per tile (each union block is one K/V load and one MMA step for all the
    tile's rows); block-major work is ~ nsel steps per token tile plus the partials' traffic (write and read of
    `nsel * (d + 2)` elements per query row). Rule: block-major when T >= AUTO_MIN_T and the mean union exceeds
    AUTO_UNION_RATIO * nsel (random-like selections at G <= 8; never at G >= 16, whose 4-token tiles cannot reach
    it). One host sync, outside a CUDA graph capture; each choice is remembered per (device, shape of `count`,
    nsel, T), and a call made while a graph is being captured (no host sync allowed) takes the choice remembered
    for its shape, measured on the same shape's last uncaptured call (a warm-up run: the locality of the model's
    own selections), or "token" if there was none. Measured on an H200 (docs/kernels_sparse.md): block-major wins
    only for random-like selections at G = 4 and long T (32k: 1.6x vs 1.1x cuDNN); at G = 16 and with
    tile-correlated selections token-major is faster, which this rule keeps.
    """
    if T < AUTO_MIN_T:
        return "token"
    key = (str(count.device), tuple(count.shape), nsel, T)
    if capturing(count):
        return LAST_ORDER.get(key, "token")
    order = "block" if count.float().mean().item() > AUTO_UNION_RATIO * nsel else "token"
    LAST_ORDER[key] = order
    return order


def sparse_attention_fwd(q, k_own, v_own, k_shared, v_shared, indices, gate_sparse, gate_swa, sinks,
                         block_size, window, scale, merge, save_branches, m_tok=None, num_warps=None,
                         num_stages=None, pair=False, order=None, block_major=None, *, softcap=0.0, tma=None):
    """Fused sparse layer forward.

    q [B, Hq, T, d]; k_own, v_own, k_shared, v_shared [B, Hkv, T, d]; indices int32 [B, Hkv, T, nsel] (ascending,
    distinct, -1 padded); gates None or [B, Hq, T, 1 | d] (any strides); sinks None or [Hq]; window 0 = no SWA
    branch. Returns out [B, Hq, T, d] (q.dtype), lse float32 [B, Hq, T, 2], branch_out [2, B, Hq, T, d] when
    save_branches (else empty). Tuning knobs (None = defaults): `m_tok` tokens per program (default ~64 rows;
    "auto": 128 or 64 rows by `block_union.choose_tokens_per_tile`), Triton's `num_warps`/`num_stages`, `pair`
    (two union blocks per step; slower on the H100, kept for tuning).

    `order` (None = DEFAULT_ORDER, "auto"): loop order of the sparse branch. "token": one kernel, each tile of
    tokens walks the union of its selected blocks (the knobs above). "block": K/V-block-major (`block_major.py`):
    each selected block's K/V is loaded once for all the tokens that picked it, per-(row, slot) partials are
    written (`B * Hq * nsel * (d * elt + 4)` bytes per token, ~4.3 GB for 32k tokens at 32/8/128, nsel 16, bf16;
    the sequence is processed in chunks so that at most `max_partial_bytes` are live), a combine kernel folds each
    row's partials into one, then a last kernel takes it as the sparse branch and runs the SWA branch, sinks, gates
    and the epilogue (m_tok/num_warps/num_stages apply to it; default 4 warps, 2 stages). "auto":
    `choose_order` on the token-major union sizes (one host sync); token-major when `m_tok` or `pair` is given
    (they tune that kernel). `merge=True` always runs token-major.
    `block_major`: dict of knobs of the block-major pass: tok (tokens per step, ~64 rows), chunk (entries per
    program), num_warps, num_stages (see `block_major.default_config`), maxnreg (`block_major.block_partials`),
    max_partial_bytes (default 1 GiB), combine ("separate": the combine kernel, then the last kernel reads slot 0;
    "fused": the last kernel folds every slot itself; default BLOCK_COMBINE).
    softcap: 0.0 (off) or c > 0, both branches' logits -> c * tanh(logits / c). `tma` (None = `token_tma`'s
    default): the token-major kernel reads K/V blocks through tensor descriptors (Hopper bulk copies).
    """
    B, Hq, T, D = q.shape
    Hkv = k_shared.shape[1]
    G = Hq // Hkv
    nsel = indices.shape[-1]
    order = order or DEFAULT_ORDER
    m_tok_given = m_tok is not None
    assert order in ("token", "block", "auto"), order
    if merge:  # one softmax over selected + window keys of the layer's own K/V, passed as k_shared/v_shared
        k_own, v_own = k_shared, v_shared
        order = "token"
    out = layout_like(q)
    q, k_own, v_own, k_shared, v_shared = (last_dim_unit(x) for x in (q, k_own, v_own, k_shared, v_shared))
    gate_sparse, gate_swa = last_dim_unit(gate_sparse), last_dim_unit(gate_swa)
    indices = indices.contiguous()
    lse = torch.empty(B, Hq, T, 2, device=q.device, dtype=torch.float32)
    branch_out = (torch.empty(2, B, Hq, T, D, device=q.device, dtype=q.dtype) if save_branches
                  else torch.empty(0, device=q.device, dtype=q.dtype))
    dummy = out
    common = (gate_sparse if gate_sparse is not None else dummy, gate_swa if gate_swa is not None else dummy,
              sinks if sinks is not None else dummy, out, lse, branch_out if save_branches else dummy)
    epi_meta = dict(HAS_SWA=window > 0, HAS_SINKS=sinks is not None, GS_MODE=gate_mode(gate_sparse),
                    GW_MODE=gate_mode(gate_swa), SAVE=bool(save_branches), SOFTCAP=bool(softcap))
    if order == "block":
        union = None
    elif m_tok == "auto":  # 128 or 64 rows from the union sizes (one host sync); measured no faster, see docs
        m_tok, (union, bits, count) = choose_tokens_per_tile(indices, G)
    else:
        m_tok = m_tok or tokens_per_tile(G)
        union, bits, count = tile_block_union(indices, m_tok)
    if order == "auto":  # explicit token-major tuning knobs (m_tok, pair) keep the token-major kernel
        order = "token" if pair or m_tok_given else choose_order(count, nsel, T, G)
    if order == "block":
        _block_major_fwd(q, k_own, v_own, k_shared, v_shared, indices, gate_sparse, gate_swa, common, epi_meta,
                         block_size, window, scale, softcap, None if m_tok == "auto" else m_tok, num_warps,
                         num_stages, block_major or {})
        return out, lse, branch_out
    launch_forward(q, k_own, v_own, k_shared, v_shared, indices, (union, bits, count), gate_sparse, gate_swa, common,
                   epi_meta, block_size, window, scale, softcap, merge, m_tok, num_warps, num_stages, pair,
                   tma=token_tma(block_size, D) if tma is None else tma)
    return out, lse, branch_out


def token_tma(block_size, head_dim):
    """The token-major kernel's default `tma`: TOKEN_TMA where it was timed (TOKEN_TMA_TIMED), else pointer loads."""
    return TOKEN_TMA if timed_at(TOKEN_TMA_TIMED, block_size, head_dim) else False


def launch_forward(q, k_own, v_own, k_shared, v_shared, indices, work, gate_sparse, gate_swa, outputs, meta,
                   block_size, window, scale, softcap, merge, m_tok, num_warps=None, num_stages=None, pair=False,
                   wrap=direct, tma=False):
    """Launch the token-major kernel. q, K/V, gates with unit last stride; work = (union, bits, count) of
    `block_union.launch_tile_union` for `m_tok` tokens per tile; outputs = (gate_sparse, gate_swa, sinks, out, lse,
    branch_out), each a tensor (a stand-in where absent, never read); meta = HAS_SWA, HAS_SINKS, GS_MODE, GW_MODE,
    SAVE, SOFTCAP. `wrap`: how the kernel is launched (`torch.library.wrap_triton` inside a `triton_op`). `tma`
    (False, True / "4d", "2d"; `common.tma_mode`): K/V blocks through tensor descriptors where they can address the
    tensors (not with `pair` or a `wrap`; a failure to build falls back to pointer loads, remembered in
    TMA_FAILED)."""
    B, Hq, T, D = q.shape
    Hkv = k_shared.shape[1]
    G = Hq // Hkv
    nsel = indices.shape[-1]
    union, bits, count = work
    m_tok, block_m, num_warps, num_stages = launch_config(G, D, block_size, m_tok, num_warps, num_stages)

    def launch(mode):
        kv = (k_shared, v_shared, k_own, v_own)
        if mode:
            kv = tuple(descriptor(x, mode, block_size) for x in kv)
        wrap(_sparse_fwd_kernel)[(triton.cdiv(T, m_tok), B * Hkv)](
            q, *kv, union, bits, count, indices, *outputs,
            *q.stride()[:3], *k_shared.stride()[:3], *v_shared.stride()[:3], *k_own.stride()[:3],
            *v_own.stride()[:3], *union.stride()[:3], *indices.stride()[:3],
            *gate_strides(gate_sparse), *gate_strides(gate_swa), *outputs[3].stride()[:3],
            T, Hkv, nsel, scale * LOG2E, softcap2(softcap), window,
            G=G, M_TOK=m_tok, BLOCK_M=block_m, BLOCK_N=block_size, D=D, NSEL_P2=triton.next_power_of_2(nsel),
            MERGE=bool(merge), PAIR=bool(pair), TMA=mode, num_warps=num_warps, num_stages=num_stages, **meta,
        )

    mode = tma_mode(tma, k_shared, v_shared, k_own, v_own) if not pair and wrap is direct else 0
    with_descriptors(TMA_FAILED, (str(q.device), q.dtype, D, (block_m, block_size, num_warps, num_stages)),
                     "the sparse layer's token-major forward", mode, launch)


def partial_chunk_tokens(B, Hq, T, D, nsel, elt, m_tok, max_partial_bytes=None):
    """Tokens per chunk of the block-major path: partials of one chunk (`B * Hq * nsel * (D * elt + 4)` bytes per
    token) fit in `max_partial_bytes` (default MAX_PARTIAL_BYTES); a multiple of m_tok, at least m_tok."""
    per_token = B * Hq * nsel * (D * elt + 4)
    tc = (max_partial_bytes or MAX_PARTIAL_BYTES) // max(1, per_token)
    return min(T, max(m_tok, tc // m_tok * m_tok))


def _block_major_fwd(q, k_own, v_own, k_shared, v_shared, indices, gate_sparse, gate_swa, common, epi_meta,
                     block_size, window, scale, softcap, m_tok, num_warps, num_stages, knobs):
    """order="block": per token chunk, sparse partials (`block_major.block_partials`), their combine into slot 0
    (`block_major.combine_partials`), then `_sparse_fwd_partials_kernel` (sparse state from slot 0, SWA branch,
    epilogue) writes out/lse/branch_out of the chunk's rows."""
    B, Hq, T, D = q.shape
    Hkv = k_shared.shape[1]
    G = Hq // Hkv
    nsel = indices.shape[-1]
    knobs = dict(knobs)
    max_bytes = knobs.pop("max_partial_bytes", None)
    combine = knobs.pop("combine", BLOCK_COMBINE)
    assert combine in ("separate", "fused"), f"block_major combine={combine!r}: 'separate' or 'fused'"
    # last kernel: launch_config's warps (4 at 64 x 128), 2 stages (H100, 32/8/128 random, 32k: 0.75 ms against 1.25
    # with 8 warps; 3 stages spill at 4 warps)
    m_tok, block_m, num_warps, num_stages = launch_config(G, D, block_size, m_tok, num_warps, num_stages or 2)
    tc = partial_chunk_tokens(B, Hq, T, D, nsel, q.element_size(), m_tok, max_bytes)
    op = torch.empty(B, Hkv, tc, nsel, G, D, device=q.device, dtype=q.dtype)
    lp = torch.empty(B, Hkv, tc, nsel, G, device=q.device, dtype=torch.float32)
    scale2 = scale * LOG2E
    lists = chunk_lists(indices, block_size, G, D, tc, knobs.get("tok"), knobs.get("chunk"))  # every chunk's at once
    for t_begin, chunk_work in zip(range(0, T, tc), lists):
        n = min(tc, T - t_begin)
        lp.fill_(float("-inf"))  # slots that selected no block keep -inf (the combine drops them)
        idx = indices[:, :, t_begin:t_begin + n]
        block_partials(q, k_shared, v_shared, idx, block_size, scale2, t_begin, op, lp, chunk_work, softcap=softcap,
                       **knobs)
        if combine == "separate":
            combine_partials(op, lp, B * Hkv * n)  # the chunk's rows are packed at the buffers' start
        _sparse_fwd_partials_kernel[(triton.cdiv(n, m_tok), B * Hkv)](
            q, k_own, v_own, op, lp, indices, *common,
            *q.stride()[:3], *k_own.stride()[:3], *v_own.stride()[:3], *indices.stride()[:3],
            *gate_strides(gate_sparse), *gate_strides(gate_swa), *common[3].stride()[:3],
            T, t_begin, n, Hkv, nsel, scale2, softcap2(softcap), window,
            G=G, M_TOK=m_tok, BLOCK_M=block_m, BLOCK_N=block_size, D=D, NSEL_P2=triton.next_power_of_2(nsel),
            COMBINE=combine == "fused", num_warps=num_warps, num_stages=num_stages, **epi_meta,
        )


def sparse_attention_supports(op="sparse_attention", **meta):
    """Reason why the Triton sparse-layer kernels cannot run a case, or None.

    op: "sparse_attention", "sparse_attention_decode" or "sparse_attention_extend" (the same limits). meta keys (all
    optional, as `backends.resolve` passes them): device, dtype (torch.dtype or its name), head_dim, group
    (Hq // Hkv), block_size, nsel.

    >>> sparse_attention_supports("sparse_attention", head_dim=96)
    'triton sparse_attention supports head dims 64 and 128 (16 and 32 for tests), got 96'
    """
    if op not in ("sparse_attention", "sparse_attention_decode", "sparse_attention_extend"):
        return f"{op} is not a sparse-layer op"
    device = meta.get("device")
    if device is not None and torch.device(device).type != "cuda" and not INTERPRET:
        return f"triton {op} needs a CUDA device (got {device}); set TRITON_INTERPRET=1 to run on CPU"
    dtype = meta.get("dtype")
    if dtype is not None and str(dtype).replace("torch.", "") not in ("float16", "bfloat16", "float32"):
        return f"triton {op} supports float16/bfloat16 (float32 for tests), got {dtype}"
    d = meta.get("head_dim")
    if d is not None and d not in (16, 32, 64, 128):
        return f"triton {op} supports head dims 64 and 128 (16 and 32 for tests), got {d}"
    group = meta.get("group")
    if group is not None and not 1 <= group <= 64:
        return f"triton {op} supports GQA groups 1..64 (query heads per KV head), got {group}"
    bs = meta.get("block_size")
    if bs is not None and bs not in (16, 32, 64, 128):
        return f"triton {op} supports block_size 16, 32, 64, 128 (one K/V tile per block), got {bs}"
    return None


__all__ = ["sparse_attention_fwd", "sparse_attention_supports", "launch_config", "launch_forward", "forward_order",
           "choose_order"]
