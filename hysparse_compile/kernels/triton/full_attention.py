"""Full-attention layer on Triton: causal flash attention + block scores + block selection (forward, backward).

Forward: one flash-attention pass (online softmax, fp32 accumulation). Per query row it also keeps a running
top-`nsel` list of (raw scaled block max logit `m_j`, block index) in registers, updated once per key block.
Within one head, `S_j = exp(m_j - lse)` ranks blocks exactly as `m_j` does, so the list is the head's exact top
`nsel` without knowing `lse`; at the end it is written as log block scores `m_j - lse`. `select_blocks.py` then
merges the G heads of each KV group. No T x T/B score tensor is written. Derivation: docs/kernels_full.md.

Backward: on CUDA, cuDNN's fused attention backward fed this forward's out and lse where it applies
(`full_attention_bwd_cudnn.py`: faster at every size measured); else FA2-style Triton kernels (delta =
rowsum(dO * O); dk/dv over query tiles, summed over the G heads of a group; dq over key tiles). Selection is not
differentiated.

Options, constexpr so that a launch without them compiles the arithmetic it always had: `SOFTCAP` (logits ->
softcap * tanh(logits / softcap); the cap is monotone, so the block maxima of the capped logits are the capped
maxima and the running top list is unchanged) and `HAS_SINKS` (a per-head sink logit joins each row's denominator;
`lse` stays the keys' own, the candidates' log block scores and the backward's probabilities use the sink-inclusive
denominator, which the backward receives folded into `lse`).

Extend (R new rows at positions `start[b] + r` against a filled cache, `full_attention_extend.py`) runs the same
forward kernel with the constexpr `HAS_START`: positions are offset per batch row, the tile loops' bounds come from
the positions; without it the kernel is the prefill kernel as it was (one more, unread, pointer argument).

Launchers (`launch_forward`, `launch_block_scores`) are public: the eager functions below and the AOTInductor
`triton_op`s (export/aoti_triton.py) both call them, the latter with `wrap=torch.library.wrap_triton`.
"""

import functools

import torch
import triton
import triton.language as tl

from . import full_attention_bwd_cudnn as bwd_cudnn
from .common import (INTERPRET, LN2_C, LOG2E, LOG2E_C, descriptor, direct, soft_cap, soft_cap_with_slope, softcap2,
                     timed_at, tma_mode, with_descriptors)
from .select_blocks import launch_merge_heads


# Tuned on H100 (bench/full_fwd_variants.py, 2026-12-05; docs/kernels_full.md, "Forward variants"); the interpreter
# uses the smallest legal tiles. "tma" (False, True / "4d", "2d"): K/V through tensor descriptors (Hopper bulk
# copies; common.tma_mode; pointer loads where a tensor can't be described or the kernel fails to build); "acc_dot":
# P @ V accumulates into the rescaled acc; "ws" (with tma): a warp-specialized off-diagonal loop. This set was
# 1.33x cuDNN against the pointer kernel's 1.42x (64x64 tiles, no descriptors), mean of 8k/32k at 32/8/128, 64/4/128.
# A persistent grid over the same heaviest-first tile order was 5-9% slower at 32k / 128k and is not kept
# (docs/kernels_full.md, "A persistent grid").
FWD_CONFIG = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3, "tma": "2d", "acc_dot": True,
              "ws": True}
# Where descriptors cannot run (before Hopper, an unaddressable tensor, under wrap_triton, a failed build): the tiles
# tuned for pointer loads (bench/tune_full_attention.py, 2026-11-23: 1.42x cuDNN against 128-row tiles' spills).
POINTER_FWD_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
DESCRIPTORS_TIMED = {(64, 128)}  # (block_size, head_dim) where FWD_CONFIG's descriptor tiles were timed (H100; None:
#                                   everywhere): common.timed_at
TMA_FAILED: dict = {}  # (device, dtype, head_dim, tiles, mode) -> why the descriptor kernel failed: pointer loads there
BWD_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3}  # dk/dv; dq uses the transpose


def full_attention_supports(op, **meta):
    """Reason why the Triton full-attention kernels cannot run a case, or None.

    op: "full_attention", "full_attention_decode" or "full_attention_extend" (the same kernels and limits). meta keys
    (all optional, as `backends.resolve` passes them): device, dtype (torch.dtype or its name), head_dim, group
    (Hq // Hkv), block_size, nsel (or topk), scale.

    >>> full_attention_supports("full_attention", head_dim=96)
    'triton full_attention supports head dims 16, 32, 64, 128, got 96'
    """
    if op not in ("full_attention", "full_attention_decode", "full_attention_extend"):
        return f"{op} is not a full-attention op"
    device = meta.get("device")
    if device is not None and torch.device(device).type != "cuda" and not INTERPRET:
        return f"triton {op} needs a CUDA device (got {device}); set TRITON_INTERPRET=1 to run on CPU"
    dtype = meta.get("dtype")
    if dtype is not None and str(dtype).replace("torch.", "") not in ("float16", "bfloat16", "float32"):
        return f"triton {op} supports float16/bfloat16/float32, got {dtype}"
    d = meta.get("head_dim")
    if d is not None and d not in (16, 32, 64, 128):
        return f"triton {op} supports head dims 16, 32, 64, 128, got {d}"
    bs = meta.get("block_size")
    if bs is not None and bs not in (16, 32, 64, 128):
        return f"triton {op} supports block_size 16, 32, 64, 128, got {bs}"
    nsel = meta.get("nsel")
    if nsel is None and bs is not None and meta.get("topk") is not None:
        nsel = meta["topk"] // bs
    if nsel is not None and nsel > 256:
        return f"triton {op} keeps at most 256 selected blocks per token, got nsel={nsel}"
    scale = meta.get("scale")
    if scale is not None and not scale > 0:
        return f"triton {op} needs a positive scale (block maxima are taken before scaling), got {scale}"
    group = meta.get("group")
    if group is None and meta.get("num_heads") and meta.get("num_kv_heads"):
        group = meta["num_heads"] / meta["num_kv_heads"]
    if group is not None and not (group == int(group) and 1 <= group <= 16):
        return f"triton {op} supports GQA groups (Hq // Hkv) 1..16, got {group}"
    return None


@triton.jit
def _insert_block(top_v, top_i, m_blk, blk):
    """Running top list update: put block `blk` (max logit m_blk [M]) in place of the worst entry if strictly better.

    Worst = lowest value, ties -> highest block index (blocks arrive in increasing order, so ties keep the lower).
    """
    v_min = tl.min(top_v, 1)
    evict = tl.max(tl.where(top_v == v_min[:, None], top_i, -(2**30)), 1)
    repl = (top_i == evict[:, None]) & (m_blk > v_min)[:, None]
    top_v = tl.where(repl, m_blk[:, None], top_v)
    top_i = tl.where(repl, blk, top_i)
    return top_v, top_i


@triton.jit
def _fwd_tile(acc, l_i, m_i, top_v, top_i, q, K, V, b, g, row0, col0, start_n, offs_m, offs_n, offs_d, skt, svt, T,
              qk_scale, cap2, DIAG: tl.constexpr, BLOCK_N: tl.constexpr, BS: tl.constexpr, IEEE: tl.constexpr,
              SELECT: tl.constexpr, SOFTCAP: tl.constexpr, TMA: tl.constexpr, ACC_DOT: tl.constexpr):
    kn = start_n + offs_n
    if TMA == 1:  # K, V: [B, Hkv, S, d] tensor descriptors; rows past S arrive as zeros
        k = K.load([b.to(tl.int32), g.to(tl.int32), start_n, 0]).reshape(BLOCK_N, offs_d.shape[0])
        v = V.load([b.to(tl.int32), g.to(tl.int32), start_n, 0]).reshape(BLOCK_N, offs_d.shape[0])
    elif TMA >= 2:  # 2-D descriptors: this head's key t is row row0 + t, columns col0 .. col0 + d - 1
        k = K.load([row0 + start_n, col0])
        v = V.load([row0 + start_n, col0])
    elif DIAG:
        k = tl.load(K + kn[:, None] * skt + offs_d[None, :], mask=kn[:, None] < T, other=0.0)
        v = tl.load(V + kn[:, None] * svt + offs_d[None, :], mask=kn[:, None] < T, other=0.0)
    else:
        k = tl.load(K + kn[:, None] * skt + offs_d[None, :])
        v = tl.load(V + kn[:, None] * svt + offs_d[None, :])
    if TMA and DIAG:  # rows past T: an extend cache's unwritten rows (any bits), or (2-D) the next head's or
        v = tl.where(kn[:, None] < T, v, 0.0)  # batch row's keys; 0 * NaN would reach acc (scores are masked below)
    if IEEE:
        qk = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        qk = tl.dot(q, tl.trans(k))  # [BLOCK_M, BLOCK_N] unscaled; qk_scale > 0 so max(qk) * s == max(qk * s)
    if SOFTCAP:  # capped logits, back in qk's units (the cap is monotone: the block maxima below stay maxima)
        qk = soft_cap(qk * qk_scale, cap2, True) / qk_scale
    if DIAG:
        qk = tl.where((offs_m[:, None] >= kn[None, :]) & (kn[None, :] < T), qk, float("-inf"))
    # block scores: row max of each key block in this tile (scaled, log2 units)
    if (BLOCK_N == BS) or (not SELECT):
        m_tile = tl.max(qk, 1) * qk_scale
        if SELECT:
            top_v, top_i = _insert_block(top_v, top_i, m_tile, start_n // BS)
    else:
        m_sub = tl.max(tl.reshape(qk, (qk.shape[0], BLOCK_N // BS, BS)), 2) * qk_scale  # [BLOCK_M, BLOCK_N // BS]
        sub = tl.arange(0, BLOCK_N // BS)[None, :]
        for s in tl.static_range(BLOCK_N // BS):
            m_s = tl.max(tl.where(sub == s, m_sub, float("-inf")), 1)
            top_v, top_i = _insert_block(top_v, top_i, m_s, start_n // BS + s)
        m_tile = tl.max(m_sub, 1)
    m_new = tl.maximum(m_i, m_tile)
    if DIAG:  # a row may have seen no key yet (m = -inf); off-diagonal rows always have one
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_safe = m_new
    p = tl.math.exp2(qk * qk_scale - m_safe[:, None])  # one FMA per logit
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if ACC_DOT:  # the product accumulates into the rescaled acc (one MMA chain, as FlashAttention-3 writes it)
        if IEEE:
            acc = tl.dot(p, v, acc * alpha[:, None], input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    elif IEEE:
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, l_i, m_new, top_v, top_i


@triton.jit
def _fwd_kernel(
    Q, K, V, Out, Lse, CandS, CandI, Sinks, Start,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
    T, Hq, G, qk_scale, cap2, S_KV,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BS: tl.constexpr,
    NSEL: tl.constexpr, NSEL_P2: tl.constexpr, IEEE: tl.constexpr, SELECT: tl.constexpr,
    SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr, HAS_START: tl.constexpr, TMA: tl.constexpr = 0,
    ACC_DOT: tl.constexpr = False, WS: tl.constexpr = False,
):
    """T query rows per (b, h). Prefill (HAS_START False): row t at position t, keys 0..T-1. Extend (HAS_START):
    row r at position Start[b] + r, keys 0..Start[b] + T - 1 of the cache; outputs indexed by row.
    TMA (Hopper's bulk copies; K/V strides then unused; S_KV = K/V rows per head): 0 pointer loads; 1 K and V are
    tensor descriptors over [B, Hkv, S, d] with block [1, 1, BLOCK_N, d]; 2 over contiguous K/V seen as
    [B * Hkv * S, d]; 3 over the model's layout [B, S, Hkv, d] seen as [B * S, Hkv * d] (2 and 3: block
    [BLOCK_N, d]). ACC_DOT: the P @ V product accumulates into the rescaled accumulator. WS: the off-diagonal loop
    is warp-specialized (`tl.range(warp_specialize=True)`: producer warps issue the bulk copies, consumer warpgroups
    do the math; with TMA only)."""
    qk_scale = tl.cast(qk_scale, tl.float32)  # a traced caller (AOTInductor, wrap_triton) passes Python floats as fp64
    start_m = tl.num_programs(0) - 1 - tl.program_id(0)  # heaviest (last) query tiles first
    bh = tl.program_id(1)
    b = (bh // Hq).to(tl.int64)  # int64: batch offsets can pass 2**31 elements
    h = (bh % Hq).to(tl.int64)
    g = h // G
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :], mask=offs_m[:, None] < T, other=0.0)
    row0 = 0
    col0 = 0
    if TMA == 2:
        row0 = ((b * (Hq // G) + g) * S_KV).to(tl.int32)
    if TMA == 3:
        row0 = (b * S_KV).to(tl.int32)
        col0 = (g * HEAD_DIM).to(tl.int32)
    if TMA:
        Kb = K
        Vb = V
    else:
        Kb = K + b * skb + g * skh
        Vb = V + b * svb + g * svh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    slot = tl.arange(0, NSEL_P2)[None, :] + tl.zeros([BLOCK_M, 1], tl.int32)  # [BLOCK_M, NSEL_P2]
    top_v = tl.where(slot < NSEL, float("-inf"), float("inf"))  # slots >= NSEL are never evicted
    top_i = -1 - slot  # distinct negative ids for empty slots
    if HAS_START:  # extend: positions start + row; keys below lo (BLOCK_N-aligned) precede every row of the tile
        s0 = tl.load(Start + b)
        pos_m = s0 + offs_m
        n_keys = s0 + T
        lo = (s0 + start_m * BLOCK_M + 1) // BLOCK_N * BLOCK_N
        hi = s0 + tl.minimum((start_m + 1) * BLOCK_M, T)
    else:  # prefill: position = row (BLOCK_M is a multiple of BLOCK_N)
        pos_m = offs_m
        n_keys = T
        lo = start_m * BLOCK_M
        hi = tl.minimum(lo + BLOCK_M, T)
    for start_n in tl.range(0, lo, BLOCK_N, warp_specialize=WS):  # strictly below the diagonal: no masks
        acc, l_i, m_i, top_v, top_i = _fwd_tile(acc, l_i, m_i, top_v, top_i, q, Kb, Vb, b, g, row0, col0, start_n,
                                                pos_m, offs_n, offs_d, skt, svt, n_keys, qk_scale, cap2, False,
                                                BLOCK_N, BS, IEEE, SELECT, SOFTCAP, TMA, ACC_DOT)
    for start_n in range(lo, hi, BLOCK_N):  # diagonal tiles: causal + bounds masks
        acc, l_i, m_i, top_v, top_i = _fwd_tile(acc, l_i, m_i, top_v, top_i, q, Kb, Vb, b, g, row0, col0, start_n,
                                                pos_m, offs_n, offs_d, skt, svt, n_keys, qk_scale, cap2, True, BLOCK_N,
                                                BS, IEEE, SELECT, SOFTCAP, TMA, ACC_DOT)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    if HAS_SINKS:  # the sink's exp joins the denominator (rows past T have m = -inf: never stored)
        l_den = l_i + tl.math.exp2(tl.load(Sinks + h).to(tl.float32) * LOG2E_C - m_i)
        out = acc / l_den[:, None]
    else:
        out = acc / l_safe[:, None]
    row_ok = offs_m < T
    tl.store(Out + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=row_ok[:, None])
    lse2 = m_i + tl.math.log2(l_safe)  # log2 units
    tl.store(Lse + bh.to(tl.int64) * T + offs_m, lse2 * LN2_C, mask=row_ok)
    if HAS_SINKS:
        lse2 = m_i + tl.math.log2(l_den)  # the block scores' denominator includes the sink
    # candidates: log block score (m_j - lse), natural log; empty / dead slots -> (-inf, -1)
    real = top_i >= 0
    cand_s = tl.where(real, (top_v - lse2[:, None]) * LN2_C, float("-inf"))
    cand_i = tl.where(real, top_i, -1)
    c_off = (bh.to(tl.int64) * T + offs_m[:, None]) * NSEL_P2 + tl.arange(0, NSEL_P2)[None, :]
    if SELECT:
        tl.store(CandS + c_off, cand_s, mask=row_ok[:, None])
        tl.store(CandI + c_off, cand_i, mask=row_ok[:, None])


@triton.jit
def _block_scores_kernel(
    Q, K, Lse, Sinks, Scores, sqb, sqh, sqt, skb, skh, skt, T, Hq, G, NB, qk_scale, cap2,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BS: tl.constexpr, IEEE: tl.constexpr,
    SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr,
):
    """Per-head block scores S [B, Hq, T, NB] (inspection path, return_scores=True)."""
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hq).to(tl.int64)  # int64: batch offsets can pass 2**31 elements
    h = (bh % Hq).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BS)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :], mask=offs_m[:, None] < T, other=0.0)
    lse2 = tl.load(Lse + bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=0.0) * LOG2E_C
    if HAS_SINKS:  # scores are probabilities of the sink-inclusive softmax
        sink2 = tl.load(Sinks + h).to(tl.float32) * LOG2E_C
        top = tl.maximum(lse2, sink2)
        lse2 = top + tl.math.log2(tl.math.exp2(lse2 - top) + tl.math.exp2(sink2 - top))
    Kb = K + b * skb + (h // G) * skh
    row = (bh.to(tl.int64) * T + offs_m) * NB
    for j in range(0, NB):
        kn = j * BS + offs_n
        k = tl.load(Kb + kn[:, None] * skt + offs_d[None, :], mask=kn[:, None] < T, other=0.0)
        if IEEE:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        else:
            qk = tl.dot(q, tl.trans(k)) * qk_scale
        qk = soft_cap(qk, cap2, SOFTCAP)
        qk = tl.where((offs_m[:, None] >= kn[None, :]) & (kn[None, :] < T), qk, float("-inf"))
        s = tl.math.exp2(tl.max(qk, 1) - lse2)  # 0 for future blocks
        tl.store(Scores + row + j, s, mask=offs_m < T)


INTERPRET_FWD_CONFIG = None  # tests set this to exercise the GPU tiling (BLOCK_N > block_size) on the interpreter


def forward_config(block_size, head_dim):
    """Tiles of the forward kernel: tuned on H100 (FWD_CONFIG), the smallest legal ones in the interpreter."""
    if INTERPRET and INTERPRET_FWD_CONFIG is not None:
        return dict(INTERPRET_FWD_CONFIG)
    if INTERPRET:
        return {"BLOCK_M": max(16, block_size), "BLOCK_N": block_size, "num_warps": 4, "num_stages": 1}
    return tuned_config(block_size, head_dim)


def tuned_config(block_size, head_dim):
    """FWD_CONFIG where its descriptor tiles were timed (DESCRIPTORS_TIMED: (block_size, head_dim) pairs), else the
    pointer tiles, the default before them (a 128-row tile with 128-key blocks or other head dims is untimed)."""
    if FWD_CONFIG.get("tma") and not timed_at(DESCRIPTORS_TIMED, block_size, head_dim):
        return pointer_tiles(block_size)
    cfg = dict(FWD_CONFIG)
    cfg["BLOCK_N"] = max(cfg["BLOCK_N"], block_size)  # powers of two: a multiple of block_size
    cfg["BLOCK_M"] = max(cfg["BLOCK_M"], cfg["BLOCK_N"])
    return cfg


def pointer_tiles(block_size):
    """The tiles for a config that asked for descriptors but runs without them: POINTER_FWD_CONFIG (BLOCK_N at least
    the block), whatever tiles the descriptor config had."""
    tiles = dict(POINTER_FWD_CONFIG)
    tiles["BLOCK_N"] = max(tiles["BLOCK_N"], block_size)
    tiles["BLOCK_M"] = max(tiles["BLOCK_M"], tiles["BLOCK_N"])
    return tiles


def full_attention_fwd(q, k, v, block_size, topk, scale, return_scores, *, sinks=None, softcap=0.0):
    """Causal attention + block selection.

    q [B, Hq, T, d], k/v [B, Hkv, T, d] -> out [B, Hq, T, d] (q.dtype), indices int32 [B, Hkv, T, nsel]
    (ascending, -1 padded), lse float32 [B, Hq, T] (the keys' own: sinks excluded), scores float32
    [B, Hq, T, ceil(T/block_size)] or empty. sinks [Hq] or None; softcap 0.0 (off) or > 0.
    """
    if INTERPRET and q.dtype == torch.bfloat16:  # the interpreter's bf16 tl.dot is wrong: run fp32, cast back
        out, indices, lse, scores = full_attention_fwd(q.float(), k.float(), v.float(), block_size, topk, scale,
                                                       return_scores, sinks=sinks, softcap=softcap)
        return out.to(q.dtype), indices, lse, scores
    q, k, v = unit_last_stride(q, k, v)
    out, lse, cand_s, cand_i = launch_forward(q, k, v, sinks, block_size, topk, scale, softcap)
    indices = merged_indices(cand_s, cand_i, k.shape[1], block_size, topk)
    scores = torch.empty(0, dtype=torch.float32, device=q.device)
    if return_scores:
        scores = launch_block_scores(q, k, lse, sinks, block_size, scale, softcap)
    return out, indices, lse, scores


def unit_last_stride(*xs):
    return tuple(x if x.stride(-1) == 1 else x.contiguous() for x in xs)


def merged_indices(cand_s, cand_i, Hkv, block_size, topk):
    """The group's selection [B, Hkv, rows, topk // block_size] from the per-head candidates of the forward."""
    B, _, rows, _ = cand_s.shape
    if topk >= block_size:
        return launch_merge_heads(cand_s, cand_i, Hkv, topk // block_size, length=rows)
    return torch.empty(B, Hkv, rows, 0, dtype=torch.int32, device=cand_s.device)


def launch_forward(q, k, v, sinks, block_size, topk, scale, softcap=0.0, wrap=direct, *, start=None, cfg=None):
    """The flash pass: out [B, Hq, T, d], lse [B, Hq, T], per-head candidates cand_s float32 / cand_i int32
    [B, Hq, T, NSEL_P2] (log block score, block index; -inf / -1 in empty slots). q/k/v: unit last stride; sinks
    [Hq] or None. `wrap`: how the kernel is launched (`torch.library.wrap_triton` inside a `triton_op`).
    start int32 [B] (extend): the T rows sit at positions start[b] + row of a cache k/v [B, Hkv, S, d] that holds
    them; cfg: the tiles (default `forward_config`)."""
    B, Hq, T, d = q.shape
    Hkv = k.shape[1]
    nsel = max(1, topk // block_size)
    nsel_p2 = triton.next_power_of_2(nsel)
    out = torch.empty_like(q)  # [B, Hq, T, d]
    lse = torch.empty((B, Hq, T), dtype=torch.float32, device=q.device)
    cand_s = torch.empty((B, Hq, T, nsel_p2), dtype=torch.float32, device=q.device)
    cand_i = torch.empty((B, Hq, T, nsel_p2), dtype=torch.int32, device=q.device)
    wanted = cfg or forward_config(block_size, d)

    def launch(tma):
        cfg = wanted if tma or not wanted.get("tma") else pointer_tiles(block_size)
        kd, vd = (k, v)
        if tma:
            kd, vd = (descriptor(x, tma, cfg["BLOCK_N"]) for x in (k, v))
        grid = (triton.cdiv(T, cfg["BLOCK_M"]), B * Hq)
        wrap(_fwd_kernel)[grid](
            q, kd, vd, out, lse, cand_s, cand_i, sinks if sinks is not None else lse,
            start if start is not None else lse,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            T, Hq, Hq // Hkv, scale * LOG2E, softcap2(softcap), k.shape[2],
            HEAD_DIM=d, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BS=block_size, NSEL=nsel, NSEL_P2=nsel_p2,
            IEEE=q.dtype == torch.float32, SELECT=topk >= block_size, SOFTCAP=bool(softcap),
            HAS_SINKS=sinks is not None, HAS_START=start is not None, TMA=tma, ACC_DOT=bool(cfg.get("acc_dot")),
            WS=bool(tma and cfg.get("ws")),
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )

    mode = tma_mode(wanted.get("tma"), k, v) if wrap is direct else 0
    tiles = tuple(wanted.get(n) for n in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "ws"))
    with_descriptors(TMA_FAILED, (str(q.device), q.dtype, d, tiles), "the full layer's forward", mode, launch)
    return out, lse, cand_s, cand_i


def launch_block_scores(q, k, lse, sinks, block_size, scale, softcap=0.0, wrap=direct):
    """Per-head block scores float32 [B, Hq, T, ceil(T / block_size)] from q, k and the forward's lse."""
    B, Hq, T, d = q.shape
    nb = triton.cdiv(T, block_size)
    scores = torch.empty(B, Hq, T, nb, dtype=torch.float32, device=q.device)
    bm = max(16, min(64, triton.next_power_of_2(T)))
    wrap(_block_scores_kernel)[(triton.cdiv(T, bm), B * Hq)](
        q, k, lse, sinks if sinks is not None else lse, scores, q.stride(0), q.stride(1), q.stride(2), k.stride(0),
        k.stride(1), k.stride(2), T, Hq, Hq // k.shape[1], nb, scale * LOG2E, softcap2(softcap),
        HEAD_DIM=d, BLOCK_M=bm, BS=block_size, IEEE=q.dtype == torch.float32, SOFTCAP=bool(softcap),
        HAS_SINKS=sinks is not None, num_warps=4,
    )
    return scores


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdb, sdh, sdt,  # DO shares q's layout via its own strides
    T, Hq, Hkv, qk_scale, scale, cap2,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bg = tl.program_id(1)
    b = (bg // Hkv).to(tl.int64)  # int64: batch offsets can pass 2**31 elements
    g = (bg % Hkv).to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    kv_ok = offs_n[:, None] < T
    k = tl.load(K + b * skb + g * skh + offs_n[:, None] * skt + offs_d[None, :], mask=kv_ok, other=0.0)
    v = tl.load(V + b * svb + g * svh + offs_n[:, None] * svt + offs_d[None, :], mask=kv_ok, other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    lo = (start_n // BLOCK_M) * BLOCK_M
    for hh in range(G):
        h = g * G + hh
        Qh = Q + b * sqb + h * sqh
        DOh = DO + b * sdb + h * sdh
        row = (b * Hq + h).to(tl.int64) * T
        for start_m in range(lo, T, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_ok = offs_m < T
            q = tl.load(Qh + offs_m[:, None] * sqt + offs_d[None, :], mask=m_ok[:, None], other=0.0)
            do = tl.load(DOh + offs_m[:, None] * sdt + offs_d[None, :], mask=m_ok[:, None], other=0.0)
            lse2 = tl.load(Lse + row + offs_m, mask=m_ok, other=0.0) * LOG2E_C
            delta = tl.load(Delta + row + offs_m, mask=m_ok, other=0.0)
            qkT = _dot(k, tl.trans(q), IEEE) * qk_scale  # [BLOCK_N, BLOCK_M]
            if SOFTCAP:
                qkT, slopeT = soft_cap_with_slope(qkT, cap2)
            pT = tl.math.exp2(qkT - lse2[None, :])
            pT = tl.where((offs_m[None, :] >= offs_n[:, None]) & m_ok[None, :], pT, 0.0)
            dv += _dot(pT.to(do.dtype), do, IEEE)
            dpT = _dot(v, tl.trans(do), IEEE)  # [BLOCK_N, BLOCK_M]
            dsT = pT * (dpT - delta[None, :])
            if SOFTCAP:
                dsT = dsT * slopeT
            dk += _dot(dsT.to(q.dtype), q, IEEE)
    # DK/DV are contiguous [B, Hkv, T, d]
    o_off = ((b * Hkv + g).to(tl.int64) * T + offs_n[:, None]) * HEAD_DIM + offs_d[None, :]
    tl.store(DK + o_off, (dk * scale).to(DK.dtype.element_ty), mask=kv_ok)
    tl.store(DV + o_off, dv.to(DV.dtype.element_ty), mask=kv_ok)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdb, sdh, sdt,
    T, Hq, G, qk_scale, scale, cap2,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    start_m = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hq).to(tl.int64)  # int64: batch offsets can pass 2**31 elements
    h = (bh % Hq).to(tl.int64)
    g = h // G
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_ok = offs_m < T
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :], mask=m_ok[:, None], other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdt + offs_d[None, :], mask=m_ok[:, None], other=0.0)
    lse2 = tl.load(Lse + bh.to(tl.int64) * T + offs_m, mask=m_ok, other=0.0) * LOG2E_C
    delta = tl.load(Delta + bh.to(tl.int64) * T + offs_m, mask=m_ok, other=0.0)
    Kb = K + b * skb + g * skh
    Vb = V + b * svb + g * svh
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    hi = tl.minimum((start_m + 1) * BLOCK_M, T)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n[:, None] < T
        k = tl.load(Kb + offs_n[:, None] * skt + offs_d[None, :], mask=n_ok, other=0.0)
        v = tl.load(Vb + offs_n[:, None] * svt + offs_d[None, :], mask=n_ok, other=0.0)
        qk = _dot(q, tl.trans(k), IEEE) * qk_scale
        if SOFTCAP:
            qk, slope = soft_cap_with_slope(qk, cap2)
        p = tl.math.exp2(qk - lse2[:, None])
        p = tl.where((offs_m[:, None] >= offs_n[None, :]) & m_ok[:, None], p, 0.0)
        dp = _dot(do, tl.trans(v), IEEE)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * slope
        dq += _dot(ds.to(k.dtype), k, IEEE)
    o_off = (bh.to(tl.int64) * T + offs_m[:, None]) * HEAD_DIM + offs_d[None, :]
    tl.store(DQ + o_off, (dq * scale).to(DQ.dtype.element_ty), mask=m_ok[:, None])


@triton.jit
def _bwd_delta_kernel(DO, O, DELTA, sdb, sdh, sdt, sob, soh, sot, n_rows, T, Hq,
                      HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr):
    """delta[row] = sum_d dO[row, d] * O[row, d] in fp32, per row of [B, Hq, T], reading both in their own dtype
    and strides (no fp32 copies of dO and O)."""
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    ok = r < n_rows
    t = r % T
    bh = r // T
    h = bh % Hq
    b = bh // Hq
    dd = tl.arange(0, HEAD_DIM)
    do = tl.load(DO + (b * sdb + h * sdh + t * sdt)[:, None] + dd[None, :], mask=ok[:, None], other=0.0)
    o = tl.load(O + (b * sob + h * soh + t * sot)[:, None] + dd[None, :], mask=ok[:, None], other=0.0)
    tl.store(DELTA + r, tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1), mask=ok)


def _bwd_delta(dout, out):
    """rowsum(dout * out) float32 [B, Hq, T]; dout and out [B, Hq, T, d] with unit last stride."""
    B, Hq, T, d = out.shape
    delta = torch.empty(B, Hq, T, dtype=torch.float32, device=out.device)
    n_rows, block_r = B * Hq * T, 32
    _bwd_delta_kernel[(triton.cdiv(n_rows, block_r),)](
        dout, out, delta, *dout.stride()[:3], *out.stride()[:3], n_rows, T, Hq,
        HEAD_DIM=d, BLOCK_R=block_r, num_warps=4)
    return delta


def full_attention_bwd(dout, q, k, v, out, lse, scale, *, sinks=None, softcap=0.0):
    """Plain causal flash backward. dout/q/out [B, Hq, T, d], k/v [B, Hkv, T, d], lse float32 [B, Hq, T] (the
    keys' own); sinks [Hq] or None (a constant here: the op computes their gradient); softcap 0.0 or > 0.

    Returns dq [B, Hq, T, d], dk/dv [B, Hkv, T, d] (dtype of the inputs); GQA heads summed per group. On CUDA the
    gradients come from cuDNN's fused attention backward where it applies (`full_attention_bwd_cudnn`; engine
    "auto"), else from the Triton kernels below (contiguous outputs).
    """
    if sinks is not None:  # the probabilities' denominator includes the sink: both engines take it folded in
        lse = torch.logaddexp(lse, sinks.float().view(1, -1, 1))
    triton_bwd = functools.partial(_triton_bwd, dout, q, k, v, out, lse, scale, softcap)
    if bwd_cudnn.use_cudnn(q, softcap):  # should cuDNN refuse this configuration: the Triton kernels (remembered)
        return bwd_cudnn.full_attention_bwd_auto(dout, q, k, v, out, lse, scale, triton_bwd=triton_bwd)
    return triton_bwd()


def _triton_bwd(dout, q, k, v, out, lse, scale, softcap):
    """The FA2 kernels; `lse` is the log-sum-exp of each row's whole denominator (sinks folded in)."""
    if INTERPRET and q.dtype == torch.bfloat16:  # the interpreter's bf16 tl.dot is wrong: run fp32, cast back
        grads = _triton_bwd(dout.float(), q.float(), k.float(), v.float(), out.float(), lse, scale, softcap)
        return tuple(g.to(q.dtype) for g in grads)
    B, Hq, T, d = q.shape
    Hkv = k.shape[1]
    q, k, v, dout, out = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v, dout, out))
    lse = lse.contiguous()
    delta = _bwd_delta(dout, out)  # [B, Hq, T] fp32, without fp32 copies of dout and out
    dq = torch.empty(B, Hq, T, d, dtype=q.dtype, device=q.device)
    dk = torch.empty(B, Hkv, T, d, dtype=k.dtype, device=q.device)
    dv = torch.empty(B, Hkv, T, d, dtype=v.dtype, device=q.device)
    ieee = q.dtype == torch.float32
    if INTERPRET:
        bm, bn, warps, stages = 16, 16, 4, 1
    else:
        bm, bn, warps, stages = (BWD_CONFIG[x] for x in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"))
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2))
    _bwd_dkdv_kernel[(triton.cdiv(T, bn), B * Hkv)](
        q, k, v, dout, lse, delta, dk, dv, *strides, T, Hq, Hkv, scale * LOG2E, scale, softcap2(softcap),
        G=Hq // Hkv, HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, IEEE=ieee, SOFTCAP=bool(softcap), num_warps=warps,
        num_stages=stages,
    )
    _bwd_dq_kernel[(triton.cdiv(T, bn), B * Hq)](
        q, k, v, dout, lse, delta, dq, *strides, T, Hq, Hq // Hkv, scale * LOG2E, scale, softcap2(softcap),
        HEAD_DIM=d, BLOCK_M=bn, BLOCK_N=bm, IEEE=ieee, SOFTCAP=bool(softcap), num_warps=warps, num_stages=stages,
    )
    return dq, dk, dv
