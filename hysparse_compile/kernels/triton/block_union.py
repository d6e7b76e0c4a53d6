"""Per-tile union of selected blocks, the work list of the sparse-layer Triton kernels.

The sparse kernels give one program a tile of `m_tok` consecutive tokens of one KV group (their `m_tok * G` query
rows share every K/V load). Each token selected its own `nsel` blocks; the program walks the sorted union of the
tile's selected blocks once and masks, per row, the blocks that row's token did not select. The work list:

- `union [B, Hkv, n_tiles, U] int32`: distinct selected blocks of the tile, ascending (entries past `count` are
  unspecified);
- `member_bits [B, Hkv, n_tiles, U] int64`: bit `m` set when the tile's token `m` selected `union[..., u]`;
- `count [B, Hkv, n_tiles] int32`: number of distinct blocks.

`tile_block_union` builds it with one Triton program per (tile, batch, KV group) (`_tile_union_kernel`: one sort of
the tile's `m_tok * nsel` keys `block * 64 + token`, a cumsum of run starts, a segmented OR scan of token bits);
`tile_block_union_torch` is the same with torch ops (kept as the test reference; ~1.8 ms at T = 32k on an H100,
where the kernel is a single launch). `choose_tokens_per_tile` picks the tile size from the union sizes.
"""

import torch
import triton
import triton.language as tl

from .common import capturing, direct

_PAD = 2**30  # sorts after every real block index (torch builder)
_PAD_KEY = tl.constexpr(2**31 - 1)  # sorts after every real key block * 64 + token (Triton builder)


def tokens_per_tile(group_size: int, rows: int = 64) -> int:
    """Tokens per program so that a tile holds about `rows` query rows (`m_tok * G`), at least 1, at most 64."""
    return max(1, min(64, rows // group_size))


@triton.jit
def _seg_or(f1, v1, f2, v2):
    """Segmented OR: a set flag on the right operand starts a new segment."""
    return f1 | f2, tl.where(f2 != 0, v2, v1 | v2)


@triton.jit
def _tile_union_kernel(IDX, UNION, BITS, COUNT, sib, sih, sit, T, HKV, NSEL, n_tiles,
                       M_TOK: tl.constexpr, N_P2: tl.constexpr, U: tl.constexpr):
    tile = tl.program_id(0)
    bg = tl.program_id(1)
    b = bg // HKV
    g = bg % HKV
    e = tl.arange(0, N_P2)  # entry e = token e // NSEL, slot e % NSEL of the tile's selections
    tok = e // NSEL
    t = tile * M_TOK + tok
    ok = (e < M_TOK * NSEL) & (t < T)
    off = b.to(tl.int64) * sib + g.to(tl.int64) * sih + t.to(tl.int64) * sit + e % NSEL
    blk = tl.load(IDX + off, mask=ok, other=-1)
    key = tl.sort(tl.where(blk >= 0, blk * 64 + tok, _PAD_KEY))  # [N_P2] ascending, padding last
    valid = key != _PAD_KEY
    blk = key >> 6
    prev = tl.gather(blk, tl.maximum(e - 1, 0), 0)
    nxt = tl.gather(blk, tl.minimum(e + 1, N_P2 - 1), 0)
    first = valid & ((e == 0) | (prev != blk))  # first entry of a run of equal blocks
    last = valid & ((e == N_P2 - 1) | (nxt != blk))  # padding's block (2**25 - 1) is no real block
    slot = tl.cumsum(first.to(tl.int32), 0) - 1  # union slot of every sorted entry
    bit = tl.where(valid, tl.full([N_P2], 1, tl.int64) << (key & 63).to(tl.int64), 0)
    _, run_bits = tl.associative_scan((first.to(tl.int32), bit), 0, _seg_or)  # OR of the run so far
    base = ((bg * n_tiles + tile).to(tl.int64)) * U
    tl.store(UNION + base + slot, blk, mask=first)
    tl.store(BITS + base + slot, run_bits, mask=last)
    tl.store(COUNT + bg * n_tiles + tile, tl.sum(first.to(tl.int32), 0))


def tile_block_union(indices: torch.Tensor, m_tok: int):
    """Union of the selected blocks of each tile of `m_tok` consecutive tokens (one Triton launch).

    indices: int32 [B, Hkv, T, nsel], distinct per row, -1 padded (the `full_attention` selection).
    Returns (union [B, Hkv, nT, U] int32, member_bits [B, Hkv, nT, U] int64, count [B, Hkv, nT] int32) with
    nT = ceil(T / m_tok) and U = m_tok * nsel; entries of union/member_bits past count are unspecified.
    """
    assert 1 <= m_tok <= 64, m_tok
    assert -(-indices.shape[2] // 64) < 2**25 - 1, "block indices must fit 25 bits"
    idx = indices if indices.dtype == torch.int32 else indices.to(torch.int32)
    if idx.stride(-1) != 1:
        idx = idx.contiguous()
    return launch_tile_union(idx, m_tok)


def launch_tile_union(idx: torch.Tensor, m_tok: int, wrap=direct):
    """The launcher of `_tile_union_kernel`: idx int32 [B, Hkv, T, nsel] with unit last stride -> (union, bits,
    count) as `tile_block_union`. `wrap`: how the kernel is launched (`torch.library.wrap_triton` inside a
    `triton_op`)."""
    B, Hkv, T, nsel = idx.shape
    n_tiles = -(-T // m_tok)
    U = m_tok * nsel
    union = torch.empty((B, Hkv, n_tiles, U), device=idx.device, dtype=torch.int32)
    bits = torch.empty((B, Hkv, n_tiles, U), device=idx.device, dtype=torch.int64)
    count = torch.empty((B, Hkv, n_tiles), device=idx.device, dtype=torch.int32)
    n_p2 = max(16, triton.next_power_of_2(U))
    wrap(_tile_union_kernel)[(n_tiles, B * Hkv)](
        idx, union, bits, count, *idx.stride()[:3], T, Hkv, nsel, n_tiles,
        M_TOK=m_tok, N_P2=n_p2, U=U, num_warps=4 if n_p2 <= 512 else 8)
    return union, bits, count


def tile_block_union_torch(indices: torch.Tensor, m_tok: int):
    """`tile_block_union` with torch ops (one segmented sort, cumsum, two scatters); padding entries = 2**30, 0."""
    assert 1 <= m_tok <= 64, m_tok
    B, Hkv, T, nsel = indices.shape
    n_tiles = -(-T // m_tok)
    pad_t = n_tiles * m_tok - T
    idx = indices.to(torch.int32)
    if pad_t:
        idx = torch.nn.functional.pad(idx, (0, 0, 0, pad_t), value=-1)
    tile_sel = idx.reshape(B, Hkv, n_tiles, m_tok * nsel)  # [B, Hkv, nT, m_tok*nsel]
    keyed = torch.where(tile_sel < 0, torch.full_like(tile_sel, _PAD), tile_sel)
    srt, order = keyed.sort(dim=-1)  # one segmented sort of 32-bit keys; padding sorts last
    first = torch.ones_like(srt, dtype=torch.bool)  # first entry of each run of equal blocks
    first[..., 1:] = srt[..., 1:] != srt[..., :-1]
    slot = first.cumsum(-1) - 1  # [B, Hkv, nT, U] union slot of every sorted entry
    union = torch.full_like(srt, _PAD).scatter_(-1, slot, srt)  # equal entries write the same value
    token_bit = torch.bitwise_left_shift(torch.ones_like(order), order // nsel)  # bit of the entry's token
    token_bit = torch.where(srt < _PAD, token_bit, torch.zeros_like(token_bit))
    member_bits = torch.zeros_like(token_bit).scatter_add_(-1, slot, token_bit)  # distinct tokens per run: add == or
    count = (first & (srt < _PAD)).sum(-1).to(torch.int32)
    return union, member_bits, count


def choose_tokens_per_tile(indices: torch.Tensor, group_size: int):
    """Tile size from the selection itself: (m_tok, (union, member_bits, count) for that m_tok).

    Rule (deterministic, one host sync): build the union of 128-row tiles (`m_tok = 128 // G`); when its mean size
    is at most 2 * nsel (neighbouring tokens share most blocks, as tile-correlated or real selections do) keep the
    128-row tiles (fewer programs, each K/V load serves twice the rows); otherwise (random-like selections: the union
    grows with the tile) use 64-row tiles. While a CUDA graph is being captured (no sync allowed): 64 rows.
    Opt-in (`sparse_attention_fwd(m_tok="auto")`): with the union kernel, 64-row tiles measured faster in every case
    on the H100 (docs/kernels_sparse.md), so the default is 64 rows.
    """
    nsel = indices.shape[-1]
    m64, m128 = tokens_per_tile(group_size, 64), tokens_per_tile(group_size, 128)
    if m128 == m64 or capturing(indices):
        return m64, tile_block_union(indices, m64)
    work = tile_block_union(indices, m128)
    if work[2].float().mean().item() <= 2 * nsel:
        return m128, work
    return m64, tile_block_union(indices, m64)
