"""Triton forward of the sparse-layer op (`hysparse::sparse_attention`): sparse branch + SWA branch in one kernel.

One program owns a tile of `m_tok` consecutive tokens of one KV group; its rows are those tokens times the G query
heads of the group (`m_tok * G` rows, about 64), so every K/V block it loads serves all of them. The sparse branch
walks the sorted union of the tile's selected blocks (`block_union.tile_block_union`) and masks, per row, the blocks
that row's token did not select and the keys after it; the SWA branch then walks the few own-K/V blocks that cover
`[t0 - window + 1, t0 + m_tok - 1]`. Each branch keeps its own online softmax; the per-head sink logit joins each
denominator; gates are applied in the epilogue and `out` is written once. `merge=True` runs one softmax over the
selected blocks and the window keys not already selected (the window walk skips selected blocks per row).

Semantics and shapes: docs/design.md (backend interface); design notes and numbers: docs/kernels_sparse.md.
"""

import torch
import triton
import triton.language as tl

from .block_union import choose_tokens_per_tile, tile_block_union, tokens_per_tile
from .online_softmax import normalize_with_sink, online_softmax_step

LOG2E = 1.4426950408889634


@triton.jit
def _row_member(bits, row_tok):
    """Rows whose token has bit `row_tok` set in the tile-union membership word `bits`."""
    return ((bits >> row_tok.to(tl.int64)) & 1) != 0


@triton.jit
def _row_selected(sel, j):
    """[M] rows whose selection list `sel [M, NSEL]` contains block `j`."""
    return tl.sum((sel == j).to(tl.int32), axis=1) > 0


@triton.jit
def _sparse_fwd_kernel(
    Q, KS, VS, KO, VO, UNION, BITS, COUNT, IDX, GS, GW, SINKS, OUT, LSE, BR,
    sqb, sqh, sqt, sksb, sksh, skst, svsb, svsh, svst, skob, skoh, skot, svob, svoh, svot,
    sub, suh, sut, sib, sih, sit,
    sgsb, sgsh, sgst, sgsd, sgwb, sgwh, sgwt, sgwd,
    T, HKV, NSEL, qk_scale2, window,
    G: tl.constexpr, M_TOK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    NSEL_P2: tl.constexpr, MERGE: tl.constexpr, HAS_SWA: tl.constexpr, HAS_SINKS: tl.constexpr,
    GS_MODE: tl.constexpr, GW_MODE: tl.constexpr, SAVE: tl.constexpr, PAIR: tl.constexpr,
):
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
    cols = tl.arange(0, BLOCK_N)

    q_off = b.to(tl.int64) * sqb + heads.to(tl.int64) * sqh + tpos.to(tl.int64) * sqt
    q = tl.load(Q + q_off[:, None] + dd[None, :], mask=row_ok[:, None], other=0.0)  # [BLOCK_M, D]

    # ---- sparse (or merged) branch over the union of the tile's selected blocks of the shared K/V
    m_s = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_s = tl.zeros([BLOCK_M], tl.float32)
    acc_s = tl.zeros([BLOCK_M, D], tl.float32)
    u_base = b.to(tl.int64) * sub + g.to(tl.int64) * suh + tile.to(tl.int64) * sut
    n_union = tl.load(COUNT + (b * HKV + g) * tl.cdiv(T, M_TOK) + tile)
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
            s = tl.dot(q, tl.trans(k)) * qk_scale2
            mem0 = (_row_member(bits0, row_tok) & row_ok)[:, None]
            mem1 = (_row_member(bits1, row_tok) & row_ok)[:, None]
            ok = tl.where(hi_half[None, :], mem1, mem0) & (kpos[None, :] <= tpos[:, None])
            s = tl.where(ok, s, float("-inf"))
            m_s, l_s, acc_s = online_softmax_step(s, v, m_s, l_s, acc_s)
    else:
        for u in range(0, n_union):
            j = tl.load(UNION + u_base + u)
            kpos = j * BLOCK_N + cols  # [BLOCK_N]
            k = tl.load(ks_base + kpos.to(tl.int64)[:, None] * skst + dd[None, :], mask=(kpos < T)[:, None],
                        other=0.0)
            v = tl.load(vs_base + kpos.to(tl.int64)[:, None] * svst + dd[None, :], mask=(kpos < T)[:, None],
                        other=0.0)
            bits = tl.load(BITS + u_base + u)
            s = tl.dot(q, tl.trans(k)) * qk_scale2  # [BLOCK_M, BLOCK_N], log2 domain
            ok = (_row_member(bits, row_tok) & row_ok)[:, None] & (kpos[None, :] <= tpos[:, None])
            s = tl.where(ok, s, float("-inf"))
            m_s, l_s, acc_s = online_softmax_step(s, v, m_s, l_s, acc_s)

    # ---- SWA branch (own K/V, positions t-window+1..t); merged into the same softmax when MERGE
    m_w = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_w = tl.zeros([BLOCK_M], tl.float32)
    acc_w = tl.zeros([BLOCK_M, D], tl.float32)
    if HAS_SWA:
        if MERGE:
            i_off = b.to(tl.int64) * sib + g.to(tl.int64) * sih + tpos.to(tl.int64) * sit
            sel = tl.load(IDX + i_off[:, None] + tl.arange(0, NSEL_P2)[None, :],
                          mask=row_ok[:, None] & (tl.arange(0, NSEL_P2)[None, :] < NSEL), other=-1)
        ko_base = KO + b.to(tl.int64) * skob + g.to(tl.int64) * skoh
        vo_base = VO + b.to(tl.int64) * svob + g.to(tl.int64) * svoh
        lo = tl.maximum(t0 - window + 1, 0) // BLOCK_N
        hi = tl.minimum(t0 + M_TOK - 1, T - 1) // BLOCK_N
        for j in range(lo, hi + 1):
            kpos = j * BLOCK_N + cols
            k = tl.load(ko_base + kpos.to(tl.int64)[:, None] * skot + dd[None, :], mask=(kpos < T)[:, None], other=0.0)
            v = tl.load(vo_base + kpos.to(tl.int64)[:, None] * svot + dd[None, :], mask=(kpos < T)[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)) * qk_scale2
            ok = row_ok[:, None] & (kpos[None, :] <= tpos[:, None]) & (kpos[None, :] > tpos[:, None] - window)
            if MERGE:
                ok = ok & (~_row_selected(sel, j))[:, None]
                s = tl.where(ok, s, float("-inf"))
                m_s, l_s, acc_s = online_softmax_step(s, v, m_s, l_s, acc_s)
            else:
                s = tl.where(ok, s, float("-inf"))
                m_w, l_w, acc_w = online_softmax_step(s, v, m_w, l_w, acc_w)

    # ---- epilogue: sinks join each denominator, gates, one write of out
    if HAS_SINKS:
        sink2 = tl.load(SINKS + heads).to(tl.float32) * 1.4426950408889634
    else:
        sink2 = tl.full([BLOCK_M], float("-inf"), tl.float32)
    o_s = normalize_with_sink(m_s, l_s, acc_s, sink2)
    o_w = normalize_with_sink(m_w, l_w, acc_w, sink2)

    o_off = ((b * (HKV * G) + heads).to(tl.int64) * T + tpos)  # row of a contiguous [B, Hq, T, *] tensor
    lse_s = tl.where(l_s > 0, (m_s + tl.log2(l_s)) * 0.6931471805599453, float("-inf"))
    lse_w = tl.where(l_w > 0, (m_w + tl.log2(l_w)) * 0.6931471805599453, float("-inf"))
    tl.store(LSE + o_off * 2, lse_s, mask=row_ok)
    tl.store(LSE + o_off * 2 + 1, lse_w, mask=row_ok)
    if SAVE:
        n_rows = (tl.num_programs(1) * G).to(tl.int64) * T
        tl.store(BR + o_off[:, None] * D + dd[None, :], o_s.to(BR.dtype.element_ty), mask=row_ok[:, None])
        tl.store(BR + (n_rows + o_off)[:, None] * D + dd[None, :], o_w.to(BR.dtype.element_ty), mask=row_ok[:, None])
    if GS_MODE > 0:  # 1: per head [.., 1], 2: per channel [.., d]
        gs_off = b.to(tl.int64) * sgsb + heads.to(tl.int64) * sgsh + tpos.to(tl.int64) * sgst
        if GS_MODE == 2:
            gs_off = gs_off[:, None] + dd[None, :] * sgsd
        else:
            gs_off = gs_off[:, None] + dd[None, :] * 0
        o_s = o_s * tl.load(GS + gs_off, mask=row_ok[:, None], other=0.0).to(tl.float32)
    if GW_MODE > 0:
        gw_off = b.to(tl.int64) * sgwb + heads.to(tl.int64) * sgwh + tpos.to(tl.int64) * sgwt
        if GW_MODE == 2:
            gw_off = gw_off[:, None] + dd[None, :] * sgwd
        else:
            gw_off = gw_off[:, None] + dd[None, :] * 0
        o_w = o_w * tl.load(GW + gw_off, mask=row_ok[:, None], other=0.0).to(tl.float32)
    tl.store(OUT + o_off[:, None] * D + dd[None, :], (o_s + o_w).to(OUT.dtype.element_ty), mask=row_ok[:, None])


def _last_dim_unit(x):
    return x if x is None or x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def _gate_mode(gate):
    return 0 if gate is None else (2 if gate.shape[-1] > 1 else 1)


def _gate_strides(gate):
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


def sparse_attention_fwd(q, k_own, v_own, k_shared, v_shared, indices, gate_sparse, gate_swa, sinks,
                         block_size, window, scale, merge, save_branches, m_tok=None, num_warps=None,
                         num_stages=None, pair=False):
    """Fused sparse layer forward.

    q [B, Hq, T, d]; k_own, v_own, k_shared, v_shared [B, Hkv, T, d]; indices int32 [B, Hkv, T, nsel] (ascending,
    -1 padded); gates None or [B, Hq, T, 1 | d] (any strides); sinks None or [Hq]; window 0 = no SWA branch.
    Returns out [B, Hq, T, d] (q.dtype), lse float32 [B, Hq, T, 2], branch_out [2, B, Hq, T, d] when
    save_branches (else empty). Tuning knobs (None = defaults): `m_tok` tokens per program (default ~64 rows;
    "auto": 128 or 64 rows by `block_union.choose_tokens_per_tile`), Triton's `num_warps`/`num_stages`, `pair`
    (two union blocks per step; slower on the H100, kept for tuning).
    """
    B, Hq, T, D = q.shape
    Hkv = k_shared.shape[1]
    G = Hq // Hkv
    nsel = indices.shape[-1]
    if merge:  # one softmax over selected + window keys of the layer's own K/V, passed as k_shared/v_shared
        k_own, v_own = k_shared, v_shared
    q, k_own, v_own, k_shared, v_shared = (_last_dim_unit(x) for x in (q, k_own, v_own, k_shared, v_shared))
    gate_sparse, gate_swa = _last_dim_unit(gate_sparse), _last_dim_unit(gate_swa)
    indices = indices.contiguous()
    if m_tok == "auto":  # 128 or 64 rows from the union sizes (one host sync); measured no faster, see docs
        m_tok, (union, bits, count) = choose_tokens_per_tile(indices, G)
    else:
        m_tok = m_tok or tokens_per_tile(G)
        union, bits, count = tile_block_union(indices, m_tok)
    m_tok, block_m, num_warps, num_stages = launch_config(G, D, block_size, m_tok, num_warps, num_stages)
    out = torch.empty(B, Hq, T, D, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, Hq, T, 2, device=q.device, dtype=torch.float32)
    branch_out = (torch.empty(2, B, Hq, T, D, device=q.device, dtype=q.dtype) if save_branches
                  else torch.empty(0, device=q.device, dtype=q.dtype))
    dummy = out
    grid = (triton.cdiv(T, m_tok), B * Hkv)
    _sparse_fwd_kernel[grid](
        q, k_shared, v_shared, k_own, v_own, union, bits, count, indices,
        gate_sparse if gate_sparse is not None else dummy, gate_swa if gate_swa is not None else dummy,
        sinks if sinks is not None else dummy, out, lse, branch_out if save_branches else dummy,
        *q.stride()[:3], *k_shared.stride()[:3], *v_shared.stride()[:3], *k_own.stride()[:3], *v_own.stride()[:3],
        *union.stride()[:3], *indices.stride()[:3],
        *_gate_strides(gate_sparse), *_gate_strides(gate_swa),
        T, Hkv, nsel, scale * LOG2E, window,
        G=G, M_TOK=m_tok, BLOCK_M=block_m, BLOCK_N=block_size, D=D, NSEL_P2=triton.next_power_of_2(nsel),
        MERGE=bool(merge), HAS_SWA=window > 0, HAS_SINKS=sinks is not None,
        GS_MODE=_gate_mode(gate_sparse), GW_MODE=_gate_mode(gate_swa), SAVE=bool(save_branches),
        PAIR=bool(pair), num_warps=num_warps, num_stages=num_stages,
    )
    return out, lse, branch_out


def sparse_attention_supports(op="sparse_attention", **meta):
    """Reason why the Triton sparse-layer kernels cannot run a case, or None.

    op: "sparse_attention" or "sparse_attention_decode". meta keys (all optional, as `backends.resolve` passes them):
    device, dtype (torch.dtype or its name), head_dim, group (Hq // Hkv), block_size, nsel.

    >>> sparse_attention_supports("sparse_attention", head_dim=96)
    'triton sparse_attention supports head dims 64 and 128 (16 and 32 for tests), got 96'
    """
    if op not in ("sparse_attention", "sparse_attention_decode"):
        return f"{op} is not a sparse-layer op"
    device = meta.get("device")
    if device is not None and torch.device(device).type != "cuda" and not _interpreting():
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


def _interpreting():
    import os
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


__all__ = ["sparse_attention_fwd", "sparse_attention_supports", "launch_config"]
