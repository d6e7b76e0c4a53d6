"""Full-attention decode on Triton: one new token per sequence, split-K over the cache, then a combine.

Split kernel: program (chunk, b, kv group) reads its chunk of the cache once for all G query heads of the group and
writes partial (m, l, acc) plus the raw scaled max logit of every key block it covers (`block_max`, log2 units).
Combine kernel: program (b, kv group) merges the partials into `out` and `lse`, turns block maxima into log block
scores `block_max - lse` (max over the group's heads) and selects the top `nsel` blocks exactly as prefill row
`t = cache_len - 1` does (same ranking and tie rule, ascending, -1 padded). `SOFTCAP` caps the logits (the block
maxima are of the capped logits), `HAS_SINKS` adds each head's sink to the denominator of the output and of the
block scores; both constexpr (see full_attention.py).
"""

import torch
import triton
import triton.language as tl

from .common import INTERPRET, LOG2E, LOG2E_C, soft_cap, softcap2
from .select_blocks import top_blocks_sorted

TARGET_PROGRAMS = 264  # ~2 waves on 132 SMs


@triton.jit
def _decode_split_kernel(
    Q, K, V, CacheLen, Mpart, Lpart, Apart, BlockMax,
    sqb, sqh, skb, skh, skt, svb, svh, svt,
    Hq, Hkv, NB, NSPLIT, CHUNK, qk_scale, cap2,
    G: tl.constexpr, QM: tl.constexpr, HEAD_DIM: tl.constexpr, BS: tl.constexpr, IEEE: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    split = tl.program_id(0)
    bg = tl.program_id(1)
    b = (bg // Hkv).to(tl.int64)  # int64: batch offsets can pass 2**31 elements
    g = (bg % Hkv).to(tl.int64)
    L = tl.load(CacheLen + b)
    r = tl.arange(0, QM)
    h = g * G + r
    h_ok = r < G
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BS)
    q = tl.load(Q + b * sqb + h[:, None] * sqh + offs_d[None, :], mask=h_ok[:, None], other=0.0)  # [QM, d]
    Kb = K + b * skb + g * skh
    Vb = V + b * svb + g * svh
    m_i = tl.full([QM], float("-inf"), tl.float32)
    l_i = tl.zeros([QM], tl.float32)
    acc = tl.zeros([QM, HEAD_DIM], tl.float32)
    lo = split * CHUNK
    hi = tl.minimum(lo + CHUNK, L)
    for start_n in range(lo, hi, BS):
        kn = start_n + offs_n
        k = tl.load(Kb + kn[:, None] * skt + offs_d[None, :], mask=kn[:, None] < L, other=0.0)
        v = tl.load(Vb + kn[:, None] * svt + offs_d[None, :], mask=kn[:, None] < L, other=0.0)
        if IEEE:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        else:
            qk = tl.dot(q, tl.trans(k)) * qk_scale  # [QM, BS]
        qk = soft_cap(qk, cap2, SOFTCAP)
        qk = tl.where(kn[None, :] < L, qk, float("-inf"))
        m_blk = tl.max(qk, 1)
        tl.store(BlockMax + ((b * Hq + h).to(tl.int64) * NB + start_n // BS), m_blk, mask=h_ok)
        m_new = tl.maximum(m_i, m_blk)
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    part = (b * Hq + h).to(tl.int64) * NSPLIT + split
    tl.store(Mpart + part, m_i, mask=h_ok)
    tl.store(Lpart + part, l_i, mask=h_ok)
    tl.store(Apart + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=h_ok[:, None])


@triton.jit
def _decode_combine_kernel(
    Mpart, Lpart, Apart, BlockMax, CacheLen, Sinks, Out, Idx,
    sob, soh, Hq, Hkv, NB, NSPLIT,
    G: tl.constexpr, G_P2: tl.constexpr, HEAD_DIM: tl.constexpr, BS: tl.constexpr,
    NB_P2: tl.constexpr, NSEL: tl.constexpr, NSEL_P2: tl.constexpr, HAS_SINKS: tl.constexpr,
):
    bg = tl.program_id(0)
    b = (bg // Hkv).to(tl.int64)  # int64: batch offsets can pass 2**31 elements
    g = (bg % Hkv).to(tl.int64)
    L = tl.load(CacheLen + b)
    r = tl.arange(0, G_P2)
    h = g * G + r
    h_ok = r < G
    offs_d = tl.arange(0, HEAD_DIM)
    part = (b * Hq + h).to(tl.int64) * NSPLIT
    m_max = tl.full([G_P2], float("-inf"), tl.float32)
    for s in range(NSPLIT):
        m_max = tl.maximum(m_max, tl.load(Mpart + part + s, mask=h_ok, other=float("-inf")))
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    l_i = tl.zeros([G_P2], tl.float32)
    acc = tl.zeros([G_P2, HEAD_DIM], tl.float32)
    for s in range(NSPLIT):
        w = tl.math.exp2(tl.load(Mpart + part + s, mask=h_ok, other=float("-inf")) - m_safe)  # 0 for empty chunks
        l_i += w * tl.load(Lpart + part + s, mask=h_ok, other=0.0)
        a = tl.load(Apart + (part + s)[:, None] * HEAD_DIM + offs_d[None, :], mask=h_ok[:, None], other=0.0)
        acc += w[:, None] * a
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    if HAS_SINKS:  # the sink's exp joins the denominator (of the output and of the block scores)
        l_safe = l_i + tl.math.exp2(tl.load(Sinks + h, mask=h_ok, other=0.0).to(tl.float32) * LOG2E_C - m_safe)
        l_safe = tl.where(l_safe == 0.0, 1.0, l_safe)
    tl.store(Out + b * sob + h[:, None] * soh + offs_d[None, :], (acc / l_safe[:, None]).to(Out.dtype.element_ty),
             mask=h_ok[:, None])
    lse2 = m_max + tl.math.log2(l_safe)  # [G_P2], log2 units
    # group log block scores: max over heads of (block_max - lse), candidate blocks j * BS < L
    j = tl.arange(0, NB_P2)
    j_ok = j * BS < L
    best = tl.full([NB_P2], float("-inf"), tl.float32)
    for hh in range(G):
        lse_h = tl.sum(tl.where(r == hh, lse2, 0.0), 0)
        row = tl.load(BlockMax + (b * Hq + g * G + hh).to(tl.int64) * NB + j, mask=j_ok, other=float("-inf"))
        best = tl.maximum(best, row - lse_h)
    best = tl.where(j_ok, best, float("-inf"))
    picked = top_blocks_sorted(best[None, :], j[None, :], NSEL, NSEL_P2)  # [1, NSEL_P2]
    col = tl.arange(0, NSEL_P2)[None, :]
    tl.store(Idx + (b * Hkv + g) * NSEL + col, picked, mask=col < NSEL)


def full_attention_decode(q, k_cache, v_cache, cache_len, block_size, topk, scale, *, sinks=None, softcap=0.0):
    """One decode step of the full layer.

    q [B, Hq, 1, d]; k_cache/v_cache [B, Hkv, S, d]; cache_len int32 [B] (the new token is at cache_len - 1,
    entries >= cache_len are ignored); sinks [Hq] or None; softcap 0.0 or > 0. Returns out [B, Hq, 1, d] (q.dtype),
    indices int32 [B, Hkv, 1, nsel].
    """
    if INTERPRET and q.dtype == torch.bfloat16:  # the interpreter's bf16 tl.dot is wrong: run fp32, cast back
        out, indices = full_attention_decode(q.float(), k_cache.float(), v_cache.float(), cache_len, block_size,
                                             topk, scale, sinks=sinks, softcap=softcap)
        return out.to(q.dtype), indices
    B, Hq, _, d = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    dev = q.device
    k_cache = k_cache if k_cache.stride(-1) == 1 else k_cache.contiguous()
    v_cache = v_cache if v_cache.stride(-1) == 1 else v_cache.contiguous()
    q = q.contiguous()
    cache_len = cache_len.to(device=dev, dtype=torch.int32).contiguous()
    nsel = topk // block_size
    nb = triton.cdiv(S, block_size)
    # chunks are whole blocks; enough of them to fill the GPU (the grid depends on S only, never on cache_len)
    nsplit = max(1, min(nb, triton.cdiv(TARGET_PROGRAMS, B * Hkv)))
    chunk = triton.cdiv(nb, nsplit) * block_size
    nsplit = triton.cdiv(S, chunk)
    m_part = torch.empty(B, Hq, nsplit, dtype=torch.float32, device=dev)
    l_part = torch.empty(B, Hq, nsplit, dtype=torch.float32, device=dev)
    a_part = torch.empty(B, Hq, nsplit, d, dtype=torch.float32, device=dev)
    block_max = torch.empty(B, Hq, nb, dtype=torch.float32, device=dev)
    ieee = q.dtype == torch.float32
    _decode_split_kernel[(nsplit, B * Hkv)](
        q, k_cache, v_cache, cache_len, m_part, l_part, a_part, block_max,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        Hq, Hkv, nb, nsplit, chunk, scale * LOG2E, softcap2(softcap),
        G=G, QM=max(16, triton.next_power_of_2(G)), HEAD_DIM=d, BS=block_size, IEEE=ieee, SOFTCAP=bool(softcap),
        num_warps=4, num_stages=1 if INTERPRET else 3,
    )
    out = torch.empty_like(q)  # [B, Hq, 1, d]
    indices = torch.empty(B, Hkv, 1, max(nsel, 0), dtype=torch.int32, device=dev)
    nsel_p2 = triton.next_power_of_2(max(nsel, 1))
    _decode_combine_kernel[(B * Hkv,)](
        m_part, l_part, a_part, block_max, cache_len, sinks if sinks is not None else m_part, out, indices,
        out.stride(0), out.stride(1), Hq, Hkv, nb, nsplit,
        G=G, G_P2=triton.next_power_of_2(G), HEAD_DIM=d, BS=block_size,
        NB_P2=triton.next_power_of_2(nb), NSEL=max(nsel, 0), NSEL_P2=nsel_p2, HAS_SINKS=sinks is not None,
        num_warps=4 if nb <= 1024 else 8,
    )
    return out, indices
