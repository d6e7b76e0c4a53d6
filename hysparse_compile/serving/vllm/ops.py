"""The paged HySparse ops as `torch.library` custom ops (namespace `hysparse_vllm`), one registration point.

    torch.ops.hysparse_vllm.paged_full_attention(q, k_cache, v_cache, block_table, query_start_loc, seq_lens,
                                                 block_size, nsel, scale)
        -> (out [N, Hq, d], indices int32 [N, Hkv, nsel])
    torch.ops.hysparse_vllm.paged_sparse_attention(q, k_shared, v_shared, shared_block_table, k_win, v_win,
                                                   win_block_table, indices, query_start_loc, seq_lens, sinks,
                                                   block_size, window, scale, merge) -> branches [N, 2, Hq, d]

Contract in `paged.py`. Every device runs the PyTorch path (`paged.py`) except CUDA with 16-bit inputs, where the
Triton kernels (`paged_triton.py`) run; `HYSPARSE_VLLM_KERNELS=torch` forces the PyTorch path there too. Fake
implementations give shapes to `torch.compile`.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from . import paged


def _use_triton(q: Tensor) -> bool:
    """16-bit inputs on CUDA. float32 stays on the PyTorch path, as `backend="auto"` does (docs/design.md): the
    kernels' tensor-core dots would round float32 to TF32."""
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and os.environ.get("HYSPARSE_VLLM_KERNELS", "triton") != "torch")


@torch.library.custom_op("hysparse_vllm::paged_full_attention", mutates_args=())
def paged_full_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, query_start_loc: Tensor,
                         seq_lens: Tensor, block_size: int, nsel: int, scale: float) -> tuple[Tensor, Tensor]:
    if _use_triton(q):
        from . import paged_triton

        return paged_triton.paged_full_attention(q, k_cache, v_cache, block_table, query_start_loc, seq_lens,
                                                 block_size, nsel, scale)
    return paged.paged_full_attention_torch(q, k_cache, v_cache, block_table, query_start_loc, seq_lens, block_size,
                                            nsel, scale)


@paged_full_attention.register_fake
def _(q, k_cache, v_cache, block_table, query_start_loc, seq_lens, block_size, nsel, scale):
    return torch.empty_like(q), q.new_empty((q.shape[0], k_cache.shape[1], nsel), dtype=torch.int32)


@torch.library.custom_op("hysparse_vllm::paged_sparse_attention", mutates_args=())
def paged_sparse_attention(q: Tensor, k_shared: Tensor, v_shared: Tensor, shared_block_table: Tensor, k_win: Tensor,
                           v_win: Tensor, win_block_table: Tensor, indices: Tensor, query_start_loc: Tensor,
                           seq_lens: Tensor, sinks: Optional[Tensor], block_size: int, window: int, scale: float,
                           merge: bool) -> Tensor:
    if _use_triton(q):
        from . import paged_triton

        return paged_triton.paged_sparse_attention(q, k_shared, v_shared, shared_block_table, k_win, v_win,
                                                   win_block_table, indices, query_start_loc, seq_lens, sinks,
                                                   block_size, window, scale, merge)
    return paged.paged_sparse_attention_torch(q, k_shared, v_shared, shared_block_table, k_win, v_win,
                                              win_block_table, indices, query_start_loc, seq_lens, sinks, block_size,
                                              window, scale, merge)


@paged_sparse_attention.register_fake
def _(q, k_shared, v_shared, shared_block_table, k_win, v_win, win_block_table, indices, query_start_loc, seq_lens,
      sinks, block_size, window, scale, merge):
    return q.new_empty((q.shape[0], 2, q.shape[1], q.shape[2]))


__all__ = ["paged_full_attention", "paged_sparse_attention"]
