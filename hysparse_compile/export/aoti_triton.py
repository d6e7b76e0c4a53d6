"""The Triton forward kernels of both prefill ops as `torch.library.triton_op`s, for AOTInductor CUDA packages.

A `triton_op` is transparent to Inductor: its body (allocations, grid arithmetic, kernel launches through
`wrap_triton`) is traced, and the kernels are compiled into the `.pt2` package, so the package runs without Python.
The bodies call the Triton backend's public launchers (`launch_forward`, `launch_merge_heads`, `launch_tile_union`,
`sparse_attention.launch_forward`) with `wrap=wrap_triton`, the same launchers the eager backend calls; they differ
from the eager path only where it branches on values a traced graph does not have (no clamp of the merge tile to the
sequence length, no interpreter-only paths, token-major order).

    hysparse_aot::full_attention(q, k, v, block_size, topk, scale, sinks?, softcap) -> (out, indices)
    hysparse_aot::sparse_attention(q, k_own, v_own, k_shared, v_shared, indices, gate_sparse?, gate_swa?, sinks?,
                                   block_size, window, scale, merge, softcap) -> out

`replacements()` maps the `hysparse::*` prefill ops onto these where `backends.resolve("auto", ...)` picks Triton
(16-bit CUDA inputs the kernels support), and onto the ATen decompositions otherwise.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.library import triton_op, wrap_triton

from ..kernels import backends, ops
from ..kernels.triton import block_union, full_attention as tfa, select_blocks as tsel, sparse_attention as tsa
from ..kernels.triton.block_union import tokens_per_tile
from . import decompositions


@triton_op("hysparse_aot::full_attention", mutates_args=())
def full_attention(q: Tensor, k: Tensor, v: Tensor, block_size: int, topk: int, scale: float,
                   sinks: Optional[Tensor] = None, softcap: float = 0.0) -> tuple[Tensor, Tensor]:
    """Causal attention + selection (the backend's `full_attention_fwd` without scores) -> out, indices int32."""
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    out, _, cand_s, cand_i = tfa.launch_forward(q, k, v, sinks, block_size, topk, scale, softcap, wrap=wrap_triton)
    return out, tsel.launch_merge_heads(cand_s, cand_i, k.shape[1], topk // block_size, wrap=wrap_triton)


@triton_op("hysparse_aot::sparse_attention", mutates_args=())
def sparse_attention(q: Tensor, k_own: Tensor, v_own: Tensor, k_shared: Tensor, v_shared: Tensor, indices: Tensor,
                     gate_sparse: Optional[Tensor], gate_swa: Optional[Tensor], sinks: Optional[Tensor],
                     block_size: int, window: int, scale: float, merge: bool, softcap: float = 0.0) -> Tensor:
    """The sparse layer forward (the backend's `sparse_attention_fwd`, token-major, 64-row tiles, no saved
    branches)."""
    B, Hq, T, D = q.shape
    if merge:
        k_own, v_own = k_shared, v_shared
    unit = tsa.last_dim_unit
    q, k_own, v_own, k_shared, v_shared, gate_sparse, gate_swa = (unit(x) for x in (q, k_own, v_own, k_shared,
                                                                                     v_shared, gate_sparse, gate_swa))
    indices = indices.contiguous()
    m_tok = tokens_per_tile(Hq // k_shared.shape[1])
    work = block_union.launch_tile_union(indices, m_tok, wrap=wrap_triton)
    out = torch.empty((B, Hq, T, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, T, 2), dtype=torch.float32, device=q.device)
    stand_in = lambda: torch.empty((1,), dtype=q.dtype, device=q.device)  # noqa: E731  (never read: no aliasing)
    outputs = (gate_sparse if gate_sparse is not None else stand_in(), gate_swa if gate_swa is not None else stand_in(),
               sinks if sinks is not None else stand_in(), out, lse, stand_in())
    meta = dict(HAS_SWA=window > 0, HAS_SINKS=sinks is not None, GS_MODE=tsa.gate_mode(gate_sparse),
                GW_MODE=tsa.gate_mode(gate_swa), SAVE=False, SOFTCAP=bool(softcap))
    tsa.launch_forward(q, k_own, v_own, k_shared, v_shared, indices, work, gate_sparse, gate_swa, outputs, meta,
                       block_size, window, scale, softcap, merge, m_tok, wrap=wrap_triton)
    return out


def _triton_runs(op: str, q: Tensor, k: Tensor, **extra) -> bool:
    """Whether the `auto` rule (kernels/backends.py) picks Triton for this call; it never does for fp32 (those take
    the decompositions, which Inductor compiles with exact fp32 matmuls)."""
    meta = dict(device=q.device, dtype=q.dtype, head_dim=q.shape[-1], group=q.shape[1] // k.shape[1], **extra)
    return backends.resolve("auto", op, **meta).NAME == "triton"


def _full(*args, **kwargs):
    c = ops.bind("full_attention", args, kwargs)
    p = c.params
    if c.return_scores or not _triton_runs("full_attention", c.q, c.k, block_size=p.block_size, nsel=p.nsel):
        return decompositions.full_attention(*args, **kwargs)
    out, indices = torch.ops.hysparse_aot.full_attention(c.q, c.k, c.v, *p.op_args(), c.sinks, p.softcap)
    B, Hq, T, _ = c.q.shape
    return out, indices, c.q.new_zeros((B, Hq, T), dtype=torch.float32), c.q.new_empty(0, dtype=torch.float32)


def _sparse(*args, **kwargs):
    c = ops.bind("sparse_attention", args, kwargs)
    p = c.params
    if c.save_branches or not _triton_runs("sparse_attention", c.q, c.k_shared, block_size=p.block_size,
                                           nsel=c.indices.shape[-1]):
        return decompositions.sparse_attention(*args, **kwargs)
    out = torch.ops.hysparse_aot.sparse_attention(c.q, c.k_own, c.v_own, c.k_shared, c.v_shared, c.indices,
                                                  c.gate_sparse, c.gate_swa, c.sinks, *p.op_args(), p.softcap)
    B, Hq, T, _ = c.q.shape
    return out, c.q.new_zeros((B, Hq, T, 2), dtype=torch.float32), c.q.new_empty(0)


def replacements() -> dict:
    """The capture-time op table for CUDA packages."""
    return {torch.ops.hysparse.full_attention.default: _full, torch.ops.hysparse.sparse_attention.default: _sparse}
