"""The Triton forward kernels of both prefill ops as `torch.library.triton_op`s, for AOTInductor CUDA packages.

A `triton_op` is transparent to Inductor: its body (allocations, grid arithmetic, `wrap_triton(kernel)[grid](...)`
launches) is traced, and the kernels are compiled into the `.pt2` package, so the package runs without Python.
The bodies launch the same kernels as the `triton` backend (`kernels/triton/full_attention.py`,
`select_blocks.py`, `block_union.py`, `sparse_attention.py`) with the backend's launch configuration; they differ
from the backend's Python launchers only where those branch on values a traced graph does not have (no
`next_power_of_2(T)` clamp of the merge tile, no interpreter-only paths).

    hysparse_aot::full_attention(q, k, v, block_size, topk, scale) -> (out, indices)
    hysparse_aot::sparse_attention(q, k_own, v_own, k_shared, v_shared, indices, gate_sparse?, gate_swa?, sinks?,
                                   block_size, window, scale, merge) -> out

`replacements()` maps the `hysparse::*` ops onto these where the Triton backend supports the case (16-bit inputs,
head dims and block sizes of `kernels/triton`), and onto the ATen decompositions otherwise.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
from torch import Tensor
from torch.library import triton_op, wrap_triton

from ..kernels import backends
from ..kernels.triton import block_union, full_attention as tfa, select_blocks as tsel, sparse_attention as tsa
from . import decompositions


@triton_op("hysparse_aot::full_attention", mutates_args=())
def full_attention(q: Tensor, k: Tensor, v: Tensor, block_size: int, topk: int, scale: float) -> tuple[Tensor, Tensor]:
    """Causal attention + selection (the backend's `full_attention_fwd` without scores) -> out, indices int32."""
    B, Hq, T, d = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    nsel = topk // block_size
    nsel_p2 = triton.next_power_of_2(nsel)
    out = torch.empty_like(q)  # [B, Hq, T, d]
    lse = torch.empty((B, Hq, T), dtype=torch.float32, device=q.device)
    cand_s = torch.empty((B, Hq, T, nsel_p2), dtype=torch.float32, device=q.device)
    cand_i = torch.empty((B, Hq, T, nsel_p2), dtype=torch.int32, device=q.device)
    cfg = tfa._fwd_config(block_size, d)
    grid = (triton.cdiv(T, cfg["BLOCK_M"]), B * Hq)
    wrap_triton(tfa._fwd_kernel)[grid](
        q, k, v, out, lse, cand_s, cand_i,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        T, Hq, G, scale * tfa.LOG2E,
        HEAD_DIM=d, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BS=block_size, NSEL=nsel, NSEL_P2=nsel_p2,
        IEEE=q.dtype == torch.float32, SELECT=True, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    indices = torch.empty((B, Hkv, T, nsel), dtype=torch.int32, device=q.device)
    g_p2 = triton.next_power_of_2(G)
    block_t = max(1, min(64, 4096 // (g_p2 * nsel_p2)))
    wrap_triton(tsel._merge_heads_kernel)[(triton.cdiv(T, block_t), B * Hkv)](
        cand_s, cand_i, indices, T, Hq, Hkv,
        G=G, G_P2=g_p2, NSEL=nsel, NSEL_P2=nsel_p2, BLOCK_T=block_t, num_warps=4,
    )
    return out, indices


@triton_op("hysparse_aot::sparse_attention", mutates_args=())
def sparse_attention(q: Tensor, k_own: Tensor, v_own: Tensor, k_shared: Tensor, v_shared: Tensor, indices: Tensor,
                     gate_sparse: Optional[Tensor], gate_swa: Optional[Tensor], sinks: Optional[Tensor],
                     block_size: int, window: int, scale: float, merge: bool) -> Tensor:
    """The sparse layer forward (the backend's `sparse_attention_fwd`, 64-row tiles, no saved branches)."""
    B, Hq, T, D = q.shape
    Hkv = k_shared.shape[1]
    G = Hq // Hkv
    nsel = indices.shape[-1]
    if merge:
        k_own, v_own = k_shared, v_shared
    q, k_own, v_own, k_shared, v_shared = (tsa._last_dim_unit(x) for x in (q, k_own, v_own, k_shared, v_shared))
    gate_sparse, gate_swa = tsa._last_dim_unit(gate_sparse), tsa._last_dim_unit(gate_swa)
    indices = indices.contiguous()
    m_tok, block_m, num_warps, num_stages = tsa.launch_config(G, D, block_size)
    # union of the selected blocks per tile of m_tok tokens (block_union.tile_block_union)
    n_tiles = triton.cdiv(T, m_tok)
    U = m_tok * nsel
    union = torch.empty((B, Hkv, n_tiles, U), dtype=torch.int32, device=q.device)
    bits = torch.empty((B, Hkv, n_tiles, U), dtype=torch.int64, device=q.device)
    count = torch.empty((B, Hkv, n_tiles), dtype=torch.int32, device=q.device)
    n_p2 = max(16, triton.next_power_of_2(U))
    wrap_triton(block_union._tile_union_kernel)[(n_tiles, B * Hkv)](
        indices, union, bits, count, indices.stride(0), indices.stride(1), indices.stride(2), T, Hkv, nsel, n_tiles,
        M_TOK=m_tok, N_P2=n_p2, U=U, num_warps=4 if n_p2 <= 512 else 8)
    out = torch.empty((B, Hq, T, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, T, 2), dtype=torch.float32, device=q.device)
    dummy = lambda: torch.empty((1,), dtype=q.dtype, device=q.device)  # noqa: E731  (never read: no aliasing)
    wrap_triton(tsa._sparse_fwd_kernel)[(n_tiles, B * Hkv)](
        q, k_shared, v_shared, k_own, v_own, union, bits, count, indices,
        gate_sparse if gate_sparse is not None else dummy(), gate_swa if gate_swa is not None else dummy(),
        sinks if sinks is not None else dummy(), out, lse, dummy(),
        *q.stride()[:3], *k_shared.stride()[:3], *v_shared.stride()[:3], *k_own.stride()[:3], *v_own.stride()[:3],
        *union.stride()[:3], *indices.stride()[:3],
        *tsa._gate_strides(gate_sparse), *tsa._gate_strides(gate_swa),
        T, Hkv, nsel, scale * tfa.LOG2E, window,
        G=G, M_TOK=m_tok, BLOCK_M=block_m, BLOCK_N=block_size, D=D, NSEL_P2=triton.next_power_of_2(nsel),
        MERGE=bool(merge), HAS_SWA=window > 0, HAS_SINKS=sinks is not None,
        GS_MODE=tsa._gate_mode(gate_sparse), GW_MODE=tsa._gate_mode(gate_swa), SAVE=False, PAIR=False,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def _triton_runs(op: str, q: Tensor, k: Tensor, **extra) -> bool:
    """The `auto` rule at trace time: Triton for 16-bit CUDA inputs the backend supports (fp32 -> decompositions,
    which Inductor compiles with exact fp32 matmuls)."""
    if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    meta = dict(device=q.device, dtype=q.dtype, head_dim=q.shape[-1], group=q.shape[1] // k.shape[1], **extra)
    return backends.unsupported_reason("triton", op, **meta) is None


def _full(q, k, v, block_size, topk, scale, return_scores, backend="auto"):
    if return_scores or not _triton_runs("full_attention", q, k, block_size=block_size, nsel=topk // block_size):
        return decompositions.full_attention(q, k, v, block_size, topk, scale, return_scores, backend)
    out, indices = torch.ops.hysparse_aot.full_attention(q, k, v, block_size, topk, scale)
    B, Hq, T, _ = q.shape
    return out, indices, q.new_zeros((B, Hq, T), dtype=torch.float32), q.new_empty(0, dtype=torch.float32)


def _sparse(q, k_own, v_own, k_shared, v_shared, indices, gate_sparse, gate_swa, sinks, block_size, window, scale,
            merge, save_branches, backend="auto"):
    args = (q, k_own, v_own, k_shared, v_shared, indices, gate_sparse, gate_swa, sinks, block_size, window, scale)
    if save_branches or not _triton_runs("sparse_attention", q, k_shared, block_size=block_size,
                                         nsel=indices.shape[-1]):
        return decompositions.sparse_attention(*args, merge, save_branches, backend)
    out = torch.ops.hysparse_aot.sparse_attention(*args, merge)
    B, Hq, T, _ = q.shape
    return out, q.new_zeros((B, Hq, T, 2), dtype=torch.float32), q.new_empty(0)


def replacements() -> dict:
    """The capture-time op table for CUDA packages."""
    return {torch.ops.hysparse.full_attention.default: _full, torch.ops.hysparse.sparse_attention.default: _sparse}
