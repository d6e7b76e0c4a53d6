"""Triton decode of the sparse-layer op: one new token per sequence, its G query heads as the rows.

At batch 1 a decode step has only B * Hkv (token, KV group) pairs, too few programs to pull the cache at full
bandwidth, so the selected blocks are split over `n_split` programs per pair (split-K); one more program per pair
reads the SWA window from the ring buffer (`k_win`, position p in slot p % W) or, with merge, from the shared cache
minus the selected blocks. Each program writes a partial (max, sum, acc); a second small kernel merges the partials
per branch, adds the sink to each denominator, applies the gates and writes the output (two launches per step).
"""

import torch
import triton
import triton.language as tl

from .common import LOG2E, LOG2E_C, soft_cap, softcap2
from .online_softmax import normalize_with_sink, online_softmax_step
from .sparse_attention import last_dim_unit


@triton.jit
def _sparse_decode_kernel(
    Q, KS, VS, KW, VW, IDX, CLEN, M, L, ACC,
    sqb, sqh, sksb, sksh, skst, svsb, svsh, svst, skwb, skwh, skwt, svwb, svwh, svwt, sib, sih,
    HKV, NSEL, W, qk_scale2, cap2, window,
    G: tl.constexpr, GP: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, NSEL_P2: tl.constexpr,
    N_SPLIT: tl.constexpr, MERGE: tl.constexpr, SOFTCAP: tl.constexpr,
):
    bg = tl.program_id(0)
    split = tl.program_id(1)
    b = bg // HKV
    g = bg % HKV
    rows = tl.arange(0, GP)
    row_ok = rows < G
    dd = tl.arange(0, D)
    cols = tl.arange(0, BLOCK_N)
    t = tl.load(CLEN + b) - 1  # position of the new token
    q_off = b.to(tl.int64) * sqb + (g * G + rows).to(tl.int64) * sqh
    q = tl.load(Q + q_off[:, None] + dd[None, :], mask=row_ok[:, None], other=0.0)  # [GP, D]
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    i_base = IDX + b.to(tl.int64) * sib + g.to(tl.int64) * sih
    ks_base = KS + b.to(tl.int64) * sksb + g.to(tl.int64) * sksh
    vs_base = VS + b.to(tl.int64) * svsb + g.to(tl.int64) * svsh
    if split < N_SPLIT:  # sparse branch: selected blocks split, N_SPLIT, ... of the shared cache
        for kk in range(split, NSEL, N_SPLIT):
            j = tl.load(i_base + kk)
            kpos = j * BLOCK_N + cols
            kok = (kpos >= 0) & (kpos <= t)  # j = -1 (padding) gives negative positions
            k = tl.load(ks_base + kpos.to(tl.int64)[:, None] * skst + dd[None, :], mask=kok[:, None], other=0.0)
            v = tl.load(vs_base + kpos.to(tl.int64)[:, None] * svst + dd[None, :], mask=kok[:, None], other=0.0)
            s = tl.where(kok[None, :], soft_cap(tl.dot(q, tl.trans(k)) * qk_scale2, cap2, SOFTCAP), float("-inf"))
            m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc)
    else:  # SWA window t-window+1..t (ring buffer), or with merge the unselected window keys of the shared cache
        if MERGE:
            sel = tl.load(i_base + tl.arange(0, NSEL_P2), mask=tl.arange(0, NSEL_P2) < NSEL, other=-1)
        for c in range(0, tl.cdiv(window, BLOCK_N)):
            kpos = t - window + 1 + c * BLOCK_N + cols
            kok = (kpos >= 0) & (kpos <= t)
            if MERGE:
                picked = tl.sum(((kpos // BLOCK_N)[:, None] == sel[None, :]).to(tl.int32), axis=1) > 0
                kok = kok & ~picked
                k = tl.load(ks_base + kpos.to(tl.int64)[:, None] * skst + dd[None, :], mask=kok[:, None], other=0.0)
                v = tl.load(vs_base + kpos.to(tl.int64)[:, None] * svst + dd[None, :], mask=kok[:, None], other=0.0)
            else:
                slot = (kpos % W).to(tl.int64)
                kw_base = KW + b.to(tl.int64) * skwb + g.to(tl.int64) * skwh
                vw_base = VW + b.to(tl.int64) * svwb + g.to(tl.int64) * svwh
                k = tl.load(kw_base + slot[:, None] * skwt + dd[None, :], mask=kok[:, None], other=0.0)
                v = tl.load(vw_base + slot[:, None] * svwt + dd[None, :], mask=kok[:, None], other=0.0)
            s = tl.where(kok[None, :], soft_cap(tl.dot(q, tl.trans(k)) * qk_scale2, cap2, SOFTCAP), float("-inf"))
            m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc)
    part = (bg * (N_SPLIT + 1) + split).to(tl.int64) * GP + rows  # [GP] row of the partial buffers
    tl.store(M + part, m_i)
    tl.store(L + part, l_i)
    tl.store(ACC + part[:, None] * D + dd[None, :], acc)


@triton.jit
def _merge_partial(m_i, l_i, acc, M, L, ACC, part, dd, D: tl.constexpr):
    """Fold the partial (max, sum, acc) at rows `part` into the running state."""
    m_p = tl.load(M + part)
    l_p = tl.load(L + part)
    a_p = tl.load(ACC + part[:, None] * D + dd[None, :])
    m_new = tl.maximum(m_i, m_p)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    beta = tl.exp2(m_p - m_safe)
    return m_new, l_i * alpha + l_p * beta, acc * alpha[:, None] + a_p * beta[:, None]


@triton.jit
def _sparse_decode_combine_kernel(
    M, L, ACC, SINKS, GS, GW, OUT, sgsb, sgsh, sgsd, sgwb, sgwh, sgwd, HKV,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, N_SPLIT: tl.constexpr, N_SPARSE: tl.constexpr,
    MERGE: tl.constexpr, HAS_SWA: tl.constexpr, HAS_SINKS: tl.constexpr, GS_MODE: tl.constexpr,
    GW_MODE: tl.constexpr,
):
    """One program per (sequence, KV group): merge the split partials per branch, add sinks, gates, write out."""
    bg = tl.program_id(0)
    b = bg // HKV
    g = bg % HKV
    rows = tl.arange(0, GP)
    row_ok = rows < G
    heads = g * G + rows
    dd = tl.arange(0, D)
    if HAS_SINKS:
        sink2 = tl.load(SINKS + heads, mask=row_ok, other=0.0).to(tl.float32) * LOG2E_C
    else:
        sink2 = tl.full([GP], float("-inf"), tl.float32)
    m_s = tl.full([GP], float("-inf"), tl.float32)
    l_s = tl.zeros([GP], tl.float32)
    acc_s = tl.zeros([GP, D], tl.float32)
    for s in range(0, N_SPARSE):  # N_SPLIT, or N_SPLIT + 1 with merge (the window split joins the same softmax)
        m_s, l_s, acc_s = _merge_partial(m_s, l_s, acc_s, M, L, ACC, (bg * (N_SPLIT + 1) + s) * GP + rows, dd, D)
    out = normalize_with_sink(m_s, l_s, acc_s, sink2)
    if GS_MODE > 0:
        g_off = b * sgsb + heads * sgsh
        if GS_MODE == 2:
            g_off = g_off[:, None] + dd[None, :] * sgsd
        else:
            g_off = g_off[:, None] + dd[None, :] * 0
        out = out * tl.load(GS + g_off, mask=row_ok[:, None], other=0.0).to(tl.float32)
    if HAS_SWA:
        if not MERGE:
            m_w = tl.full([GP], float("-inf"), tl.float32)
            l_w = tl.zeros([GP], tl.float32)
            acc_w = tl.zeros([GP, D], tl.float32)
            m_w, l_w, acc_w = _merge_partial(m_w, l_w, acc_w, M, L, ACC, (bg * (N_SPLIT + 1) + N_SPLIT) * GP + rows,
                                             dd, D)
            o_w = normalize_with_sink(m_w, l_w, acc_w, sink2)
            if GW_MODE > 0:
                g_off = b * sgwb + heads * sgwh
                if GW_MODE == 2:
                    g_off = g_off[:, None] + dd[None, :] * sgwd
                else:
                    g_off = g_off[:, None] + dd[None, :] * 0
                o_w = o_w * tl.load(GW + g_off, mask=row_ok[:, None], other=0.0).to(tl.float32)
            out = out + o_w
    tl.store(OUT + (b * (HKV * G) + heads).to(tl.int64)[:, None] * D + dd[None, :], out.to(OUT.dtype.element_ty),
             mask=row_ok[:, None])


def _combine(m, l, acc, sink2):
    """Merge split partials (dim 1) into one normalized output; sink2 [N, G] (log2 domain) or None."""
    top = m.amax(1)  # [N, G]
    if sink2 is not None:
        top = torch.maximum(top, sink2)
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    w = torch.exp2(m - top[:, None])  # [N, S, G]
    num = (acc * w[..., None]).sum(1)  # [N, G, D]
    den = (l * w).sum(1)
    if sink2 is not None:
        den = den + torch.exp2(sink2 - top)
    den = torch.where(den == 0, torch.ones_like(den), den)
    return num / den[..., None]


def _combine_with_torch(m, l, acc, sinks, gate_sparse, gate_swa, n_split, merge, has_win, shape):
    """Torch version of the combine kernel. m, l [B*Hkv, n_split+1, GP], acc [.., GP, D]; shape (B, Hkv, G, D)."""
    B, Hkv, G, D = shape
    m, l, acc = m[..., :G], l[..., :G], acc[..., :G, :]
    sink2 = None if sinks is None else (sinks.float() * LOG2E).reshape(1, Hkv, G).expand(B, Hkv, G).reshape(-1, G)
    if merge:
        return _combine(m, l, acc, sink2).reshape(B, Hkv * G, 1, D)
    out = _combine(m[:, :n_split], l[:, :n_split], acc[:, :n_split], sink2).reshape(B, Hkv * G, 1, D)
    out = out * gate_sparse.float() if gate_sparse is not None else out
    if has_win:
        o_swa = _combine(m[:, n_split:], l[:, n_split:], acc[:, n_split:], sink2).reshape(B, Hkv * G, 1, D)
        out = out + (o_swa * gate_swa.float() if gate_swa is not None else o_swa)
    return out


def default_split(batch_kv, nsel):
    """Programs per (sequence, KV group) for the sparse branch: enough to fill ~2 waves of an H100 (132 SMs)."""
    return max(1, min(nsel, 264 // max(1, batch_kv)))


def sparse_attention_decode(q, k_win, v_win, k_shared, v_shared, indices, cache_len, gate_sparse, gate_swa, sinks,
                            block_size, window, scale, merge, n_split=None, fused_combine=True, *, softcap=0.0):
    """One decode step of the sparse layer.

    q [B, Hq, 1, d]; k_win, v_win [B, Hkv, W, d] SWA ring buffer (position p in slot p % W; ignored with merge);
    k_shared, v_shared [B, Hkv, S, d]; indices int32 [B, Hkv, 1, nsel]; cache_len int32 [B] (the new token is at
    cache_len - 1); gates None or [B, Hq, 1, 1 | d]; sinks None or [Hq]. Returns out [B, Hq, 1, d].
    `n_split`: programs per (sequence, KV group) for the selected blocks; `fused_combine=False` merges the
    partials with torch ops instead of the combine kernel (the version timed on the GPU, docs/kernels_sparse.md).
    softcap: 0.0 (off) or c > 0, both branches' logits -> c * tanh(logits / c).
    """
    B, Hq, _, D = q.shape
    Hkv = k_shared.shape[1]
    G = Hq // Hkv
    nsel = indices.shape[-1]
    q, k_shared, v_shared = (last_dim_unit(x) for x in (q, k_shared, v_shared))
    has_win = window > 0
    if merge or not has_win or k_win is None:
        k_win, v_win = k_shared, v_shared  # unused by the kernel
    k_win, v_win = last_dim_unit(k_win), last_dim_unit(v_win)
    W = k_win.shape[2]
    n_split = n_split or default_split(B * Hkv, nsel)
    gp = max(16, triton.next_power_of_2(G))
    n_parts = n_split + 1
    m = torch.empty(B * Hkv, n_parts, gp, device=q.device, dtype=torch.float32)
    l = torch.empty_like(m)
    acc = torch.empty(B * Hkv, n_parts, gp, D, device=q.device, dtype=torch.float32)
    indices = indices.reshape(B, Hkv, nsel)
    _sparse_decode_kernel[(B * Hkv, n_parts)](
        q, k_shared, v_shared, k_win, v_win, indices, cache_len.to(torch.int32), m, l, acc,
        q.stride(0), q.stride(1), *k_shared.stride()[:3], *v_shared.stride()[:3], *k_win.stride()[:3],
        *v_win.stride()[:3], indices.stride(0), indices.stride(1),
        Hkv, nsel, W, scale * LOG2E, softcap2(softcap), window if has_win else 0,
        G=G, GP=gp, BLOCK_N=block_size, D=D, NSEL_P2=triton.next_power_of_2(nsel), N_SPLIT=n_split,
        MERGE=bool(merge), SOFTCAP=bool(softcap), num_warps=4, num_stages=2,
    )
    if not fused_combine:
        return _combine_with_torch(m, l, acc, sinks, gate_sparse, gate_swa, n_split, merge, has_win,
                                   (B, Hkv, G, D)).to(q.dtype)
    out = torch.empty(B, Hq, 1, D, device=q.device, dtype=q.dtype)
    gs, gw = last_dim_unit(gate_sparse), last_dim_unit(gate_swa)
    gstr = lambda x: (0, 0, 0) if x is None else (x.stride(0), x.stride(1), x.stride(3))  # noqa: E731
    _sparse_decode_combine_kernel[(B * Hkv,)](
        m, l, acc, sinks if sinks is not None else m, gs if gs is not None else m, gw if gw is not None else m, out,
        *gstr(gs), *gstr(gw), Hkv,
        G=G, GP=gp, D=D, N_SPLIT=n_split, N_SPARSE=n_split + 1 if merge else n_split, MERGE=bool(merge),
        HAS_SWA=has_win, HAS_SINKS=sinks is not None,
        GS_MODE=0 if gs is None or merge else (2 if gs.shape[-1] > 1 else 1),
        GW_MODE=0 if gw is None or merge else (2 if gw.shape[-1] > 1 else 1), num_warps=4,
    )
    return out


__all__ = ["sparse_attention_decode"]
