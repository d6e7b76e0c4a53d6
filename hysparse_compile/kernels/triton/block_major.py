"""K/V-block-major sparse branch of the sparse-layer forward (the loop order of Flash Sparse Attention).

The token-major kernel (`sparse_attention._sparse_fwd_kernel`) walks, per tile of tokens, the union of the blocks its
tokens selected; when neighbouring tokens select unrelated blocks (random-like selections, small GQA groups) the
union is ~`m_tok * nsel` blocks and every K/V block is re-read for a few tokens. This branch inverts the loop:

1. `token_lists`: for each chunk of tokens and each (batch, KV group, block j) the list of (token t, slot s) pairs
   that selected j, in ascending t (torch ops, no host sync, once for every chunk: one stable sort of int16 or int32
   keys `(chunk * B * Hkv + group) * n_blocks + j`, a searchsorted for the per-block offsets, and a work table that
   splits each list into pieces of `chunk` entries).
2. `_block_partials_kernel`: one program per (group, block j, chunk of j's list) loads K_j, V_j once and walks its
   entries `tok` at a time (`tok * G` query rows gathered from q, e.g. 16 tokens x 4 heads = 64 rows): one block of
   scores per row, causal mask (only the token's own block is cut), local softmax; it writes per (row, slot) the
   normalized partial output (q.dtype) and its log2-sum-exp (fp32; -inf = nothing visible).
3. `_combine_partials_kernel` (FlashAttention-3's split-KV combine) folds each row's `nsel` partials into slot 0,
   in place: the log-sum-exps first, then the partial outputs streamed with wide loads.
4. The last kernel (`sparse_attention._sparse_fwd_partials_kernel`) takes slot 0 as the sparse branch's (max, sum,
   acc) state, then runs the SWA branch, sinks, gates and the same epilogue as the token-major kernel, so `out`,
   `lse` and `branch_out` mean exactly the same.

Partials take `B * Hq * T_chunk * nsel * (d * elt + 4)` bytes; the driver (`sparse_attention_fwd`) processes the
sequence in chunks of tokens so that this stays under `max_partial_bytes`.

The backward's sparse branch has the same loop order (`_block_grads_kernel`, `block_grads`): a program loads K_j,
V_j once, walks the same (token, slot) lists, recomputes each row's probabilities from the forward's log-sum-exp and
keeps dK_j, dV_j in registers; each step's dq rows are added with fp32 atomics (every (row, block) pair is visited by
one program only, so the only contention is between blocks of one row), and the block's dK/dV are added once per
program (a busy block's list is split over several programs). No partials, no second pass. Design notes:
docs/kernels_sparse.md.
"""

import torch
import triton
import triton.language as tl

from .common import LOG2E, soft_cap, soft_cap_with_slope, softcap2

# the kernels index within a batch row of q and within one (batch, group) of the partials (forward) or the whole of
# dq / do (backward) with int32 offsets when every such offset is below this, else with int64 (tests lower it)
INT32_OFFSETS = 2**31
# registers per thread of the partials kernel at 4 warps: 168 lets three programs share an SM (the compiler takes
# 186 at 32/8/128 without a cap, two programs; H100, 2026-12-06, docs/kernels_sparse.md: 3.06 -> 2.63 ms at 32k,
# 14.7 -> 12.4 ms at 128k, no spill reported)
PARTIALS_MAXNREG = 168
# token_lists sorts int16 bucket keys when there are fewer buckets than this (tests lower it), else int32
INT16_KEYS_BELOW = 2**15 - 1


@triton.jit
def _work_item(ITEM_BUCKET, ITEM_CHUNK, START, NB, HKV, CHUNK: tl.constexpr):
    """This program's work item: (live, bg, j, b, g, lo, hi) = whether it has one, its (batch * Hkv + group), key
    block, batch, group and the entries [lo, hi) of the block's (token, slot) list (lo == hi when idle)."""
    item = tl.program_id(0)
    bucket = tl.load(ITEM_BUCKET + item)  # group * NB + block, -1 past the last work item
    c = tl.load(ITEM_CHUNK + item)
    live = bucket >= 0
    bucket = tl.maximum(bucket, 0)
    bg = bucket // NB
    j = bucket % NB
    lo = tl.load(START + bucket).to(tl.int64) + c.to(tl.int64) * CHUNK
    hi = tl.minimum(tl.load(START + bucket + 1).to(tl.int64), lo + CHUNK)
    return live, bg, j, bg // HKV, bg % HKV, lo, tl.where(live, hi, lo)


@triton.jit
def _block_kv(KS, VS, b, g, j, live, T, sksb, sksh, skst, svsb, svsh, svst, BLOCK_N: tl.constexpr,
              D: tl.constexpr):
    """Key positions [BLOCK_N], their validity [BLOCK_N, 1] (none for an idle program) and K_j, V_j [BLOCK_N, D]."""
    dd = tl.arange(0, D)
    kpos = j * BLOCK_N + tl.arange(0, BLOCK_N)
    kv_ok = (kpos < tl.where(live, T, 0))[:, None]  # no load for an idle program
    k = tl.load(KS + b.to(tl.int64) * sksb + g.to(tl.int64) * sksh + kpos.to(tl.int64)[:, None] * skst + dd[None, :],
                mask=kv_ok, other=0.0)
    v = tl.load(VS + b.to(tl.int64) * svsb + g.to(tl.int64) * svsh + kpos.to(tl.int64)[:, None] * svst + dd[None, :],
                mask=kv_ok, other=0.0)
    return kpos, kv_ok, k, v


@triton.jit
def _partials_step(LIST, OPg, LPg, e0, hi, Qg, q_row, row_tok, hh, dd, k, v, kpos, T_BEGIN, sqt, qk_scale2, cap2,
                   NSEL: tl.constexpr, G: tl.constexpr, TOK: tl.constexpr, D: tl.constexpr, SOFTCAP: tl.constexpr,
                   DIAG: tl.constexpr, OFF64: tl.constexpr):
    """Entries e0 .. e0 + TOK - 1 (those < hi) of the block's list: TOK tokens x G heads of scores against K_j, their
    local softmax and P V_j, written as normalized partial rows with their log2-sum-exps. DIAG: some token may see
    only part of the block (or none of it), so keys after the token are masked; otherwise every key is visible.
    Qg, OPg, LPg: this program's batch of q and its (batch, group) of the partial buffers; offsets from them are
    int32 unless OFF64."""
    ent = e0 + row_tok
    ok = (row_tok < TOK) & (ent < hi)
    pair = tl.load(LIST + ent, mask=ok, other=0).to(tl.uint32)  # t_local * NSEL + s, non-negative
    t_loc = (pair // NSEL).to(tl.int32)
    s_slot = (pair % NSEL).to(tl.int32)
    t = T_BEGIN + t_loc
    if OFF64:
        q_off = q_row + t.to(tl.int64) * sqt
    else:
        q_off = q_row + t * sqt
    q = tl.load(Qg + q_off[:, None] + dd[None, :], mask=ok[:, None], other=0.0)
    if SOFTCAP:
        s = soft_cap(tl.dot(q, tl.trans(k)) * qk_scale2, cap2, True)  # [BLOCK_M, BLOCK_N], log2 domain
        c = 1.0
    else:  # scaled inside the exp2's argument (one FMA per score); qk_scale2 > 0, so the max commutes with it
        s = tl.dot(q, tl.trans(k))
        c = qk_scale2
    if DIAG:
        s = tl.where(ok[:, None] & (kpos[None, :] <= t[:, None]), s, float("-inf"))  # t < T: the key exists
        m = tl.max(s, axis=1) * c
        m = tl.where(m == float("-inf"), 0.0, m)
    else:  # every key of the block precedes every token (a padded row has q = 0: finite scores, not stored)
        m = tl.max(s, axis=1) * c
    p = tl.exp2(s * c - m[:, None])
    l = tl.sum(p, axis=1)
    if DIAG:
        l_safe = tl.where(l > 0, l, 1.0)
        inv = tl.where(l > 0, 1.0 / l_safe, 0.0)
        lse2 = tl.where(l > 0, m + tl.log2(l_safe), float("-inf"))
    else:  # l >= 1: the row's max contributes 2^0
        inv = 1.0 / l
        lse2 = m + tl.log2(l)
    acc = tl.dot((p * inv[:, None]).to(v.dtype), v)  # normalized before the product: BLOCK_N, not D, multiplies a row
    # partial row (t_local, slot, head) of this (batch, group)'s [TC, NSEL, G, D] part of the buffer
    prow = (t_loc * NSEL + s_slot) * G + hh
    if OFF64:
        prow = prow.to(tl.int64)
    tl.store(LPg + prow, lse2, mask=ok)
    # streaming store: the partials are read once, by the combine kernel; keep L2 for K_j, V_j and q
    tl.store(OPg + prow[:, None] * D + dd[None, :], acc.to(OPg.dtype.element_ty),
             mask=ok[:, None], eviction_policy="evict_first")


@triton.jit
def _block_partials_kernel(
    Q, KS, VS, LIST, START, ITEM_BUCKET, ITEM_CHUNK, OP, LP,
    sqb, sqh, sqt, sksb, sksh, skst, svsb, svsh, svst,
    T, T_BEGIN, TC, HKV, NB, qk_scale2, cap2,
    NSEL: tl.constexpr, G: tl.constexpr, TOK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    D: tl.constexpr, CHUNK: tl.constexpr, SOFTCAP: tl.constexpr, OFF64: tl.constexpr,
):
    live, bg, j, b, g, lo, hi = _work_item(ITEM_BUCKET, ITEM_CHUNK, START, NB, HKV, CHUNK)
    dd = tl.arange(0, D)
    kpos, kv_ok, k, v = _block_kv(KS, VS, b, g, j, live, T, sksb, sksh, skst, svsb, svsh, svst, BLOCK_N, D)

    rows = tl.arange(0, BLOCK_M)
    row_tok = rows // G  # entry of the row inside the current tile of TOK entries
    hh = rows % G  # query head of the row inside the group
    Qg = Q + b.to(tl.int64) * sqb
    if OFF64:
        q_row = (g * G + hh).to(tl.int64) * sqh  # [BLOCK_M] offset of the row's head
    else:
        q_row = (g * G + hh) * sqh
    gb = bg.to(tl.int64) * TC * NSEL * G
    OPg = OP + gb * D
    LPg = LP + gb
    # The list is in ascending t, so the entries whose token precedes the block's end (the tokens inside block j,
    # and any that picked a block after them) come first: masked steps while a step starts with one, then steps
    # whose every token sees all of K_j.
    e0 = lo
    t0 = T_BEGIN + tl.load(LIST + e0, mask=e0 < hi, other=0) // NSEL
    while (e0 < hi) & (t0 < (j + 1) * BLOCK_N):
        _partials_step(LIST, OPg, LPg, e0, hi, Qg, q_row, row_tok, hh, dd, k, v, kpos, T_BEGIN, sqt, qk_scale2, cap2,
                       NSEL, G, TOK, D, SOFTCAP, True, OFF64)
        e0 += TOK
        t0 = T_BEGIN + tl.load(LIST + e0, mask=e0 < hi, other=0) // NSEL
    for e in range(e0, hi, TOK):
        _partials_step(LIST, OPg, LPg, e, hi, Qg, q_row, row_tok, hh, dd, k, v, kpos, T_BEGIN, sqt, qk_scale2, cap2,
                       NSEL, G, TOK, D, SOFTCAP, False, OFF64)


@triton.jit
def _slots_max(m, LP, base, hh, head_ok, s0, NSEL, G, N: tl.constexpr):
    """Running max of the log2-sum-exps of slots s0 .. s0 + N - 1 (those < NSEL) of HC heads."""
    for ds in tl.static_range(N):
        s = s0 + ds
        m = tl.maximum(m, tl.load(LP + base + s * G, mask=head_ok & (hh * 0 + s < NSEL), other=float("-inf")))
    return m


@triton.jit
def _slots_fold(l, acc, OP, LP, base, hh, head_ok, dd, m_safe, s0, NSEL, G, N: tl.constexpr, D: tl.constexpr):
    """Add slots s0 .. s0 + N - 1 (those < NSEL) to (l, acc): weights 2^(lse_s - m), outputs [HC, D]. Unrolled, so
    the N slots' loads are in flight at once; an empty slot's output, never written (any bits), is read anyway (the
    loads do not wait on the weights) and dropped with a select, never a multiply."""
    for ds in tl.static_range(N):
        s = s0 + ds
        ok = head_ok & (hh * 0 + s < NSEL)  # (a tensor: the interpreter's masks must be)
        w = tl.exp2(tl.load(LP + base + s * G, mask=ok, other=float("-inf")) - m_safe)  # 0 for an empty slot
        o = tl.load(OP + (base + s * G)[:, None] * D + dd[None, :], mask=ok[:, None], other=0.0,
                    eviction_policy="evict_first")
        l += w
        acc += tl.where((w > 0)[:, None], w[:, None] * o.to(tl.float32), 0.0)
    return l, acc


@triton.jit
def _combine_partials_kernel(OP, LP, NSEL, G, NSEL_P2: tl.constexpr, HC: tl.constexpr, D: tl.constexpr):
    """Fold each (token, head)'s NSEL partials into slot 0, in place (the FlashAttention-3 split-KV combine).

    One program per (token row, chunk of HC heads) of a contiguous [rows, NSEL, G, D] partial buffer: it reads the
    HC heads' log2-sum-exps of every slot first (their max), then streams the slots' [HC, D] outputs (contiguous,
    wide loads, unrolled so that they are in flight at once; past 32 slots, 16 at a time, which bounds registers
    and compile time) and writes sum_s 2^(lse_s - lse) o_s with lse = log2 sum_s 2^lse_s to slot 0 (lse -inf and
    o = 0 when no slot saw a key). No cross-thread reduction: each thread owns its columns of the output. A program
    reads and writes only its own entries, so in place is race-free."""
    row = tl.program_id(0).to(tl.int64)  # token row of the buffer: (b * Hkv + g) * TC + t_local
    hh = tl.program_id(1) * HC + tl.arange(0, HC)
    dd = tl.arange(0, D)
    head_ok = hh < G
    base = row * NSEL * G + hh  # [HC] entries of slot 0
    m = tl.full([HC], float("-inf"), tl.float32)
    l = tl.zeros([HC], tl.float32)
    acc = tl.zeros([HC, D], tl.float32)
    if NSEL_P2 <= 32:
        m = _slots_max(m, LP, base, hh, head_ok, 0, NSEL, G, NSEL_P2)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        l, acc = _slots_fold(l, acc, OP, LP, base, hh, head_ok, dd, m_safe, 0, NSEL, G, NSEL_P2, D)
    else:
        for s0 in range(0, NSEL, 16):
            m = _slots_max(m, LP, base, hh, head_ok, s0, NSEL, G, 16)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        for s0 in range(0, NSEL, 16):
            l, acc = _slots_fold(l, acc, OP, LP, base, hh, head_ok, dd, m_safe, s0, NSEL, G, 16, D)
    l_safe = tl.where(l > 0, l, 1.0)
    tl.store(LP + base, tl.where(l > 0, m_safe + tl.log2(l_safe), float("-inf")), mask=head_ok)
    tl.store(OP + base[:, None] * D + dd[None, :], (acc / l_safe[:, None]).to(OP.dtype.element_ty),
             mask=head_ok[:, None])


def combine_partials(op, lp, rows, max_elems=1024):
    """In place: for the first `rows` token rows of the contiguous partial buffers op [.., nsel, G, d] and
    lp [.., nsel, G], slot 0 becomes the softmax combine of all nsel slots (normalized output, log2-sum-exp). A
    program takes HC heads of one row (HC * d <= max_elems, a power of two; 8 elements per thread)."""
    nsel, G, D = op.shape[-3:]
    assert op.is_contiguous() and lp.is_contiguous() and rows * nsel * G * D <= op.numel()
    hc = max(1, min(triton.next_power_of_2(G), max_elems // D))
    hc = 1 << (hc.bit_length() - 1)  # a power of two whatever max_elems is
    _combine_partials_kernel[(rows, triton.cdiv(G, hc))](
        op, lp, nsel, G, NSEL_P2=triton.next_power_of_2(nsel), HC=hc, D=D, num_warps=max(1, min(8, hc * D // 256)))


@triton.jit
def _block_grads_kernel(
    Q, KS, VS, DO, L2, DELTA, LIST, START, ITEM_BUCKET, ITEM_CHUNK, DQ, DK, DV,
    sqb, sqh, sqt, sksb, sksh, skst, svsb, svsh, svst,
    T, HKV, NB, qk_scale2, scale, cap2,
    NSEL: tl.constexpr, G: tl.constexpr, TOK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    D: tl.constexpr, CHUNK: tl.constexpr, SOFTCAP: tl.constexpr, OFF64: tl.constexpr,
):
    """Sparse-branch gradients of one work item (key block j of one KV group, one chunk of its list): dq rows / scale
    added to DQ (fp32 [B, Hq, T, D]), dK_j/dV_j to DK/DV (fp32 [B, Hkv, T, D]). DO/L2/DELTA are contiguous [B, Hq, T, *]
    (do of the sparse branch, its log2-sum-exp with sinks folded in, do . o). Offsets inside a batch row of q and
    inside DQ/DO/L2/DELTA are int32 unless OFF64. Every step keeps the causal mask: splitting the loop into masked
    and unmasked steps, as the forward does, makes the sm_90 build spill three times as much (dK_j and dV_j live
    across both loops)."""
    live, bg, j, b, g, lo, hi = _work_item(ITEM_BUCKET, ITEM_CHUNK, START, NB, HKV, CHUNK)
    dd = tl.arange(0, D)
    kpos, kv_ok, k, v = _block_kv(KS, VS, b, g, j, live, T, sksb, sksh, skst, svsb, svsh, svst, BLOCK_N, D)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)

    rows = tl.arange(0, BLOCK_M)
    row_tok = rows // G
    heads = g * G + rows % G
    Qg = Q + b.to(tl.int64) * sqb
    r_row = b * (HKV * G) + heads  # row of contiguous [B, Hq, T, *] at t = 0, times T
    if OFF64:
        q_row = heads.to(tl.int64) * sqh
        r_row = r_row.to(tl.int64) * T
    else:
        q_row = heads * sqh
        r_row = r_row * T
    for e0 in range(lo, hi, TOK):
        ent = e0 + row_tok
        ok = (row_tok < TOK) & (ent < hi)
        t = (tl.load(LIST + ent, mask=ok, other=0).to(tl.uint32) // NSEL).to(tl.int32)  # entries t * NSEL + s >= 0
        if OFF64:
            t = t.to(tl.int64)
        q = tl.load(Qg + (q_row + t * sqt)[:, None] + dd[None, :], mask=ok[:, None], other=0.0)
        r = r_row + t
        do = tl.load(DO + r[:, None] * D + dd[None, :], mask=ok[:, None], other=0.0)
        l2 = tl.load(L2 + r, mask=ok, other=0.0)
        delta = tl.load(DELTA + r, mask=ok, other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale2
        if SOFTCAP:
            s, slope = soft_cap_with_slope(s, cap2)
        p = tl.where(ok[:, None] & (kpos[None, :] <= t[:, None]), tl.exp2(s - l2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * slope
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do)
        tl.atomic_add(DQ + r[:, None] * D + dd[None, :], tl.dot(ds.to(k.dtype), k), mask=ok[:, None], sem="relaxed")
    g_off = (bg.to(tl.int64) * T + kpos)[:, None] * D + dd[None, :]
    kmask = (kpos < tl.where(hi > lo, T, 0))[:, None]  # nothing to add for an idle program
    tl.atomic_add(DK + g_off, dk * scale, mask=kmask, sem="relaxed")
    tl.atomic_add(DV + g_off, dv, mask=kmask, sem="relaxed")


def token_lists(indices, n_blocks, chunk, tc=None):
    """Inverse of a selection: for each chunk of `tc` tokens and each (batch, KV group, block) the (token, slot) pairs
    of that chunk that selected the block.

    indices: int32 [B, Hkv, T, nsel] (distinct per row, -1 padded; entries outside [0, n_blocks) are ignored); tc:
    tokens per chunk (None: T, one chunk). Returns one (lists, start, item_bucket, item_chunk) per chunk: lists int32
    (entries `t_local * nsel + s`, t_local counted from the chunk's first token, sorted by (chunk, group, block, t),
    valid entries first; shared by every chunk); start int64 [B * Hkv * n_blocks + 1] (a view): the list of the
    chunk's bucket `(b * Hkv + g) * n_blocks + j` is lists[start[k]:start[k + 1]]; item_bucket, item_chunk int32
    [n_items]: work item i covers entries `start[bucket] + chunk * chunk_len ...` of its bucket, bucket -1 = no work.
    One stable sort of int16 or int32 keys for every chunk at once (a few small ops, not a few per chunk), no host
    synchronization: n_items is an upper bound (`min(buckets, entries) + ceil(entries / chunk)` of the chunk).
    """
    B, Hkv, T, nsel = indices.shape
    dev = indices.device
    tc = min(tc or T, T)
    n_ch = -(-T // tc)
    nb = B * Hkv * n_blocks  # buckets per chunk
    n_buckets = n_ch * nb
    assert n_buckets < 2**31 - 1 and T * nsel < 2**31, "token_lists: int32 keys"
    idx = indices.to(torch.int32)
    base = torch.arange(B * Hkv, device=dev, dtype=torch.int32).view(B, Hkv, 1, 1) * n_blocks
    if n_ch > 1:  # key (chunk, group, block): each chunk's lists are contiguous
        base = base + (torch.arange(T, device=dev, dtype=torch.int32) // tc * nb).view(1, 1, T, 1)
    valid = (idx >= 0) & (idx < n_blocks)
    # int16 keys where the buckets fit: the radix sort then makes half the passes
    kdt = torch.int16 if n_buckets < INT16_KEYS_BELOW else torch.int32
    keys = torch.where(valid, base + idx, n_buckets).to(kdt).reshape(-1)
    skeys, perm = torch.sort(keys, stable=True)  # stable: within a bucket, ascending t
    lists = perm % (T * nsel)  # t * nsel + s
    if n_ch > 1:  # t_local (the sentinel keys past the last chunk hold entries nobody reads)
        lists -= (skeys.to(torch.int32) // nb).clamp(max=n_ch - 1) * (tc * nsel)
    lists = lists.to(torch.int32)
    start = torch.searchsorted(skeys, torch.arange(n_buckets + 1, device=dev, dtype=kdt))
    counts = start[1:] - start[:-1]
    pieces = (counts + chunk - 1) // chunk  # work items per bucket
    ends = torch.cumsum(pieces, 0)  # exclusive end item of each bucket
    n_items = []
    for c in range(n_ch):
        entries = B * Hkv * min(tc, T - c * tc) * nsel
        n_items.append(max(1, min(nb, entries) + -(-entries // chunk)))
    first = torch.zeros(n_ch, device=dev, dtype=ends.dtype)  # the first item of each chunk
    first[1:] = ends[nb - 1:-1:nb]
    item = first[:, None] + torch.arange(max(n_items), device=dev, dtype=ends.dtype)  # [n_ch, max items]
    bucket = torch.searchsorted(ends, item, right=True)  # first bucket whose end is past the item
    chunk_first = torch.arange(n_ch, device=dev, dtype=bucket.dtype)[:, None] * nb
    live = bucket < chunk_first + nb
    bucket_c = bucket.clamp(max=n_buckets - 1)
    item_chunk = item - (ends[bucket_c] - pieces[bucket_c])
    item_bucket = torch.where(live, bucket_c - chunk_first, -1).to(torch.int32)
    item_chunk = torch.where(live, item_chunk, 0).to(torch.int32)
    return [(lists, start[c * nb:(c + 1) * nb + 1], item_bucket[c, :n_items[c]], item_chunk[c, :n_items[c]])
            for c in range(n_ch)]


def default_config(G, D, block_size, tok=None, chunk=None, num_warps=None, num_stages=None):
    """(tok, BLOCK_M, chunk, num_warps, num_stages) of the partial kernel; arguments that are not None override.

    Default: ~64 rows per step (`tok = 64 // G` tokens x G heads, at least 16 rows), `chunk` = 16 steps' entries per
    program (enough to amortize the K/V block load, small enough to spread the busy early blocks over many
    programs), 4 warps (8 when a step gathers more than 16 tokens or the tile exceeds 64 x 128: at G = 1 the 64-token
    gather spills registers with 4 warps, sm_90 compile), 3 stages (H100, 32/8/128 random, 32k: 3.94 ms against
    4.46 with 2 stages; 128 rows with 8 warps: 5.19; 64-step chunks: 4.49; docs/kernels_sparse.md).
    """
    tok = tok or max(1, 64 // G)
    block_m = max(16, triton.next_power_of_2(tok * G))
    chunk = chunk or 16 * tok
    chunk = -(-chunk // tok) * tok
    num_warps = num_warps or (4 if block_m * max(D, block_size) <= 64 * 128 and tok <= 16 else 8)
    return tok, block_m, chunk, num_warps, num_stages or 3


def partials_maxnreg(num_warps, maxnreg=None):
    """The partials kernel's register cap: `maxnreg` if given (0: none), else PARTIALS_MAXNREG at 4 warps (three
    programs per SM) and none otherwise."""
    if maxnreg is None:
        return PARTIALS_MAXNREG if num_warps == 4 else None
    return maxnreg or None


def chunk_lists(indices, block_size, G, D, tc, tok=None, chunk=None):
    """`token_lists` of every chunk of `tc` tokens of `indices` [B, Hkv, T, nsel], for `block_partials(lists=...)`
    with the same `tok` / `chunk` knobs."""
    chunk = default_config(G, D, block_size, tok, chunk)[2]
    return token_lists(indices, triton.cdiv(indices.shape[2], block_size), chunk, tc)


def _int64_offsets(q, span):
    """Whether the block-major kernels need int64 offsets: an element offset inside one batch row of q, or `span`
    (the largest offset from a kernel's other per-program bases), could reach INT32_OFFSETS."""
    B, Hq, T, D = q.shape
    return max((T - 1) * q.stride(2) + (Hq - 1) * q.stride(1) + D, span) >= INT32_OFFSETS


def block_partials(q, k_shared, v_shared, indices, block_size, scale2, t_begin, op, lp, lists, tok=None, chunk=None,
                   num_warps=None, num_stages=None, softcap=0.0, maxnreg=None):
    """Sparse-branch partials of the tokens `t_begin .. t_begin + TC - 1`.

    q [B, Hq, T, d]; k_shared, v_shared [B, Hkv, T, d] (last dim unit stride); indices int32 [B, Hkv, TC, nsel]
    (the rows of those tokens, contiguous); scale2 = scale * log2(e). Fills op [B, Hkv, TC, nsel, G, d] (normalized
    partial outputs) and lp [B, Hkv, TC, nsel, G] float32 (log2-sum-exp of each partial); slots without a block are
    not written (the caller fills lp with -inf first). Knobs: `default_config`'s, and `maxnreg` (Triton's cap on
    registers per thread, `partials_maxnreg`). `lists`: this chunk's entry of `chunk_lists`, made for every chunk at
    once with the same `tok` / `chunk` knobs.
    """
    B, Hq, T, D = q.shape
    Hkv = k_shared.shape[1]
    G = Hq // Hkv
    TC, nsel = indices.shape[2], indices.shape[3]
    n_blocks = triton.cdiv(T, block_size)
    tok, block_m, chunk, num_warps, num_stages = default_config(G, D, block_size, tok, chunk, num_warps, num_stages)
    maxnreg = partials_maxnreg(num_warps, maxnreg)
    lists, start, item_bucket, item_chunk = lists
    off64 = _int64_offsets(q, TC * nsel * G * D)  # one (batch, group) of the partials
    _block_partials_kernel[(item_bucket.numel(),)](
        q, k_shared, v_shared, lists, start, item_bucket, item_chunk, op, lp,
        *q.stride()[:3], *k_shared.stride()[:3], *v_shared.stride()[:3],
        T, t_begin, TC, Hkv, n_blocks, scale2, softcap2(softcap),
        NSEL=nsel, G=G, TOK=tok, BLOCK_M=block_m, BLOCK_N=block_size, D=D, CHUNK=chunk, SOFTCAP=bool(softcap),
        OFF64=off64, num_warps=num_warps, num_stages=num_stages, **({"maxnreg": maxnreg} if maxnreg else {}),
    )


def grads_config(G, D, block_size, tok=None, chunk=None, num_warps=None, num_stages=None):
    """(tok, BLOCK_M, chunk, num_warps, num_stages) of `_block_grads_kernel`; arguments that are not None override.

    Default from `bench/tune_block_bwd.py --sweep` on an H200 (32/8/128, random selections; docs/kernels_sparse.md):
    64 rows per step (`tok = 64 // G` tokens), 32 steps' entries per program, 4 warps, 1 stage (2 stages: 1.5x
    slower at 4 warps; 128 rows with 8 warps: 7% slower)."""
    tok = tok or max(1, 64 // G)
    block_m = max(16, triton.next_power_of_2(tok * G))
    chunk = chunk or 32 * tok
    chunk = -(-chunk // tok) * tok
    num_warps = num_warps or (4 if block_m * max(D, block_size) <= 64 * 128 else 8)
    return tok, block_m, chunk, num_warps, num_stages or 1


def block_grads(q, k_shared, v_shared, do, l2, delta, indices, block_size, scale, dq, dk, dv, tok=None, chunk=None,
                num_warps=None, num_stages=None, softcap=0.0):
    """Sparse-branch gradients in K/V-block-major order, added into dq [B, Hq, T, d] (dq / scale: the caller scales
    it once), dk, dv [B, Hkv, T, d] (all float32, contiguous; the caller zeroes them). do, l2 (log2-sum-exp, sinks
    folded in), delta: contiguous [B, Hq, T, *] rows of the sparse branch; indices int32 [B, Hkv, T, nsel]. Knobs:
    `grads_config`."""
    B, Hq, T, D = q.shape
    Hkv = k_shared.shape[1]
    G = Hq // Hkv
    nsel = indices.shape[-1]
    n_blocks = triton.cdiv(T, block_size)
    tok, block_m, chunk, num_warps, num_stages = grads_config(G, D, block_size, tok, chunk, num_warps, num_stages)
    lists, start, item_bucket, item_chunk = token_lists(indices, n_blocks, chunk)[0]
    off64 = _int64_offsets(q, B * Hq * T * D)  # dq and do, whole
    _block_grads_kernel[(item_bucket.numel(),)](
        q, k_shared, v_shared, do, l2, delta, lists, start, item_bucket, item_chunk, dq, dk, dv,
        *q.stride()[:3], *k_shared.stride()[:3], *v_shared.stride()[:3],
        T, Hkv, n_blocks, scale * LOG2E, scale, softcap2(softcap),
        NSEL=nsel, G=G, TOK=tok, BLOCK_M=block_m, BLOCK_N=block_size, D=D, CHUNK=chunk, SOFTCAP=bool(softcap),
        OFF64=off64, num_warps=num_warps, num_stages=num_stages,
    )


__all__ = ["token_lists", "chunk_lists", "block_partials", "combine_partials", "block_grads", "default_config",
           "grads_config", "partials_maxnreg"]
