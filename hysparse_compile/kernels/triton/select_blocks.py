"""select_blocks: merge per-head candidate blocks into the per-group selection (Triton).

The full-attention forward keeps, per query row and head, the exact top-`nsel` blocks of that head (see
`full_attention.py`). The group top-`nsel` of `S_g = max_h S_h` is always contained in the union of the G heads'
lists (docs/kernels_full.md), so this kernel only has to rank `G * nsel` candidates per row:
dedupe equal block ids (keeping the best score), take the top `nsel` by (score desc, block index asc), and write
them sorted ascending by block index with `-1` padding (docs/design.md).
"""

import torch
import triton
import triton.language as tl

from .common import direct

BIG_INDEX = tl.constexpr(2**30)  # larger than any block index; sorts after every real index, then becomes -1


@triton.jit
def top_blocks_sorted(scores, ids, NSEL: tl.constexpr, NSEL_P2: tl.constexpr):
    """Rank candidates of a [R, C] tile: top NSEL by (score desc, id asc), ids deduped, sorted asc, -1 padded.

    `scores` float32 [R, C] (-inf for empty slots), `ids` int32 [R, C]. Returns int32 [R, NSEL_P2].
    """
    col = tl.arange(0, NSEL_P2)[None, :]
    picked = tl.full([scores.shape[0], NSEL_P2], BIG_INDEX, tl.int32)
    for r in range(NSEL):
        best = tl.max(scores, 1)  # [R]
        chosen = tl.min(tl.where(scores == best[:, None], ids, BIG_INDEX), 1)  # lowest id among the best
        chosen = tl.where(best > float("-inf"), chosen, BIG_INDEX)
        picked = tl.where(col == r, chosen[:, None], picked)
        scores = tl.where(ids == chosen[:, None], float("-inf"), scores)  # dedupe: every copy of that id
    picked = tl.sort(picked, 1)
    return tl.where(picked == BIG_INDEX, -1, picked)


@triton.jit
def _merge_heads_kernel(
    CandS, CandI, Idx,  # CandS/CandI [B, Hq, T, NSEL_P2], Idx int32 [B, Hkv, T, NSEL]
    T, Hq, Hkv,
    G: tl.constexpr, G_P2: tl.constexpr, NSEL: tl.constexpr, NSEL_P2: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid_t = tl.program_id(0)
    bg = tl.program_id(1)
    b = bg // Hkv
    g = bg % Hkv
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.arange(0, G_P2 * NSEL_P2)
    head = g * G + c // NSEL_P2
    slot = c % NSEL_P2
    # candidate c of row t lives at CandX[b, head, t, slot]
    off = ((b * Hq + head[None, :]) * T + offs_t[:, None]).to(tl.int64) * NSEL_P2 + slot[None, :]
    ok = (offs_t[:, None] < T) & ((c // NSEL_P2)[None, :] < G)
    scores = tl.load(CandS + off, mask=ok, other=float("-inf"))  # [BLOCK_T, G_P2*NSEL_P2]
    ids = tl.load(CandI + off, mask=ok, other=-1)
    picked = top_blocks_sorted(scores, ids, NSEL, NSEL_P2)  # [BLOCK_T, NSEL_P2]
    col = tl.arange(0, NSEL_P2)
    out = Idx + ((b * Hkv + g) * T + offs_t[:, None]).to(tl.int64) * NSEL + col[None, :]
    tl.store(out, picked, mask=(offs_t[:, None] < T) & (col[None, :] < NSEL))


def launch_merge_heads(cand_scores, cand_ids, num_kv_heads, nsel, length=None, wrap=direct):
    """Group selection from per-head candidates.

    cand_scores float32 [B, Hq, T, NSEL_P2] (log block scores, -inf empty), cand_ids int32 same shape (-1 empty).
    Returns indices int32 [B, Hkv, T, nsel], sorted ascending, -1 padded. `length`: T when known on the host (the
    row tile is then no taller than the sequence); None in a traced `triton_op` (`wrap=wrap_triton`), where T is
    symbolic.
    """
    B, Hq, T, nsel_p2 = cand_scores.shape
    G = Hq // num_kv_heads
    indices = torch.empty((B, num_kv_heads, T, nsel), dtype=torch.int32, device=cand_scores.device)
    # keep the candidate tile near 4k elements per program
    block_t = max(1, min(64, 4096 // (triton.next_power_of_2(G) * nsel_p2)))
    if length is not None:
        block_t = min(block_t, triton.next_power_of_2(length))
    grid = (triton.cdiv(T, block_t), B * num_kv_heads)
    wrap(_merge_heads_kernel)[grid](
        cand_scores, cand_ids, indices, T, Hq, num_kv_heads,
        G=G, G_P2=triton.next_power_of_2(G), NSEL=nsel, NSEL_P2=nsel_p2, BLOCK_T=block_t, num_warps=4,
    )
    return indices
