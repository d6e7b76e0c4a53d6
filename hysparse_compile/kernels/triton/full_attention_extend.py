"""Full-attention extend on Triton: R new query rows per sequence at positions `start[b] .. start[b] + R - 1`
against a cache that already holds their K/V (chunked prefill, speculative verification).

It is the prefill forward kernel (`full_attention._fwd_kernel`) launched with `HAS_START`: row r of sequence b sits
at position `start[b] + r` and attends to cache keys `0 .. start[b] + r`; the tiles strictly before a query tile's
first position run unmasked, the rest with the causal mask; each head keeps its exact running top list of block
maxima (blocks `j * block_size <= position` only), and `select_blocks.launch_merge_heads` merges the G heads of a
group as in prefill (same ranking and tie rule, ascending, -1 padded). Cache slots at and after `start[b] + R` are
never read. Forward only (extend serves inference).
"""

import torch
import triton

from .common import INTERPRET, direct
from .full_attention import forward_config, launch_forward, merged_indices, pointer_tiles, unit_last_stride

# From how many new rows extend takes the forward's descriptor tiles (FWD_CONFIG's tma / ws, 128 rows, 8 warps);
# fewer rows keep its pointer tiles. Measured on the H100 (docs/benchmarks.md, "Seventh session"), both shapes:
# descriptors 7-8% faster at R = 512, 29-62% slower at R = 8 and 64 (rows between were not timed).
# `bench_extend --descriptors` sets 1.
EXTEND_DESCRIPTORS_MIN_ROWS = 512


def extend_config(block_size, head_dim, rows):
    """Tiles of the extend launch: the forward's (its pointer tiles below EXTEND_DESCRIPTORS_MIN_ROWS rows), with
    query tiles no taller than the rows (at least 16)."""
    cfg = forward_config(block_size, head_dim)
    if cfg.get("tma") and rows < EXTEND_DESCRIPTORS_MIN_ROWS:
        cfg = pointer_tiles(block_size)
    cfg["BLOCK_M"] = min(cfg["BLOCK_M"], max(16, triton.next_power_of_2(rows)))
    return cfg


def launch_extend(q, k_cache, v_cache, start, sinks, block_size, topk, scale, softcap=0.0, wrap=direct):
    """The flash pass of the extend rows: out [B, Hq, R, d] and the per-head candidates cand_s float32 / cand_i int32
    [B, Hq, R, NSEL_P2] (log block score, block index; -inf / -1 in empty slots) for `launch_merge_heads`.

    q [B, Hq, R, d], k_cache/v_cache [B, Hkv, S, d] (unit last stride; S >= start[b] + R); start int32 [B] on q's
    device; sinks [Hq] or None. `wrap`: how the kernel is launched (`torch.library.wrap_triton` in a `triton_op`).
    """
    out, _, cand_s, cand_i = launch_forward(q, k_cache, v_cache, sinks, block_size, topk, scale, softcap, wrap,
                                            start=start, cfg=extend_config(block_size, q.shape[-1], q.shape[2]))
    return out, cand_s, cand_i


def full_attention_extend(q, k_cache, v_cache, start, block_size, topk, scale, *, sinks=None, softcap=0.0):
    """R new tokens per row at positions start[b] + r, already written in the caches.

    q [B, Hq, R, d]; k_cache/v_cache [B, Hkv, S, d]; start int [B] (start[b] + R <= S); sinks [Hq] or None;
    softcap 0.0 (off) or > 0 -> out [B, Hq, R, d] (q.dtype), indices int32 [B, Hkv, R, topk // block_size]
    (ascending, -1 padded): the rows the prefill op gives for these positions on the first start[b] + R entries.
    """
    if INTERPRET and q.dtype == torch.bfloat16:  # the interpreter's bf16 tl.dot is wrong: run fp32, cast back
        out, indices = full_attention_extend(q.float(), k_cache.float(), v_cache.float(), start, block_size, topk,
                                             scale, sinks=sinks, softcap=softcap)
        return out.to(q.dtype), indices
    q, k_cache, v_cache = unit_last_stride(q, k_cache, v_cache)
    start = start.to(device=q.device, dtype=torch.int32).contiguous()
    out, cand_s, cand_i = launch_extend(q, k_cache, v_cache, start, sinks, block_size, topk, scale, softcap)
    return out, merged_indices(cand_s, cand_i, k_cache.shape[1], block_size, topk)


__all__ = ["full_attention_extend", "launch_extend", "extend_config"]
