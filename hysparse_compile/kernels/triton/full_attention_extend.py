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

from .common import INTERPRET, LOG2E, softcap2
from .full_attention import _fwd_kernel, forward_config
from .select_blocks import launch_merge_heads


def _eager(kernel):
    return kernel


def extend_config(block_size, head_dim, rows):
    """Tiles of the extend launch: the forward's, with query tiles no taller than the rows (at least 16)."""
    cfg = forward_config(block_size, head_dim)
    cfg["BLOCK_M"] = min(cfg["BLOCK_M"], max(16, triton.next_power_of_2(rows)))
    return cfg


def launch_extend(q, k_cache, v_cache, start, sinks, block_size, topk, scale, softcap=0.0, wrap=_eager):
    """The flash pass of the extend rows: out [B, Hq, R, d] and the per-head candidates cand_s float32 / cand_i int32
    [B, Hq, R, NSEL_P2] (log block score, block index; -inf / -1 in empty slots) for `launch_merge_heads`.

    q [B, Hq, R, d], k_cache/v_cache [B, Hkv, S, d] (unit last stride; S >= start[b] + R); start int32 [B] on q's
    device; sinks [Hq] or None. `wrap`: how the kernel is launched (`torch.library.wrap_triton` in a `triton_op`).
    """
    B, Hq, R, d = q.shape
    Hkv = k_cache.shape[1]
    nsel = max(1, topk // block_size)
    nsel_p2 = triton.next_power_of_2(nsel)
    out = torch.empty_like(q)
    lse = torch.empty((B, Hq, R), dtype=torch.float32, device=q.device)  # written by the kernel, not returned
    cand_s = torch.empty((B, Hq, R, nsel_p2), dtype=torch.float32, device=q.device)
    cand_i = torch.empty((B, Hq, R, nsel_p2), dtype=torch.int32, device=q.device)
    cfg = extend_config(block_size, d, R)
    wrap(_fwd_kernel)[(triton.cdiv(R, cfg["BLOCK_M"]), B * Hq)](
        q, k_cache, v_cache, out, lse, cand_s, cand_i, sinks if sinks is not None else lse, start,
        q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1), out.stride(2),
        R, Hq, Hq // Hkv, scale * LOG2E, softcap2(softcap),
        HEAD_DIM=d, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BS=block_size, NSEL=nsel, NSEL_P2=nsel_p2,
        IEEE=q.dtype == torch.float32, SELECT=topk >= block_size, SOFTCAP=bool(softcap), HAS_SINKS=sinks is not None,
        HAS_START=True, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
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
    B, Hq, R, d = q.shape
    Hkv = k_cache.shape[1]
    q, k_cache, v_cache = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k_cache, v_cache))
    start = start.to(device=q.device, dtype=torch.int32).contiguous()
    out, cand_s, cand_i = launch_extend(q, k_cache, v_cache, start, sinks, block_size, topk, scale, softcap)
    if topk >= block_size:
        indices = launch_merge_heads(cand_s, cand_i, Hkv, topk // block_size, length=R)  # [B, Hkv, R, nsel]
    else:
        indices = torch.empty(B, Hkv, R, 0, dtype=torch.int32, device=q.device)
    return out, indices


__all__ = ["full_attention_extend", "launch_extend", "extend_config"]
