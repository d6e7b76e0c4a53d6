"""The flex backend: both HySparse ops through `torch.nn.attention.flex_attention`.

- full layer: causal flex for out and lse; block scores recomputed from q.k^T in query chunks; reference selection.
- sparse layer: exact per-token sparse branch via a mask_mod lookup (block mask = per-tile union), SWA branch as a
  sliding-window block mask, merge as one mask, sinks through the lse, gates outside the kernel.
- backward: autograd through flex (recomputed forward); decode: the naive math on the single query row; extend
  (R new tokens against a cache): flex with the rows' offsets in the masks (`extend.py`).
- softcap: a score_mod; sinks (both layers): flex's output rescaled by `sigmoid(lse - sink)`.
- CUDA runs torch.compile(flex_attention) (compiled once per process, one graph per shape and mask);
  CPU runs flex eagerly, so CPU CI pays no compile time.
"""
from __future__ import annotations

import torch

from .extend import full_attention_extend, sparse_attention_extend
from .full_attention import full_attention_bwd, full_attention_decode, full_attention_fwd, scoring_chunk_elems
from .sparse_attention import sparse_attention_bwd, sparse_attention_decode, sparse_attention_fwd

NAME = "flex"

_DTYPES_CUDA = {torch.float16, torch.bfloat16, torch.float32}


def _dtype(value) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    return getattr(torch, str(value).replace("torch.", ""), None)


def supports(op: str, **meta) -> str | None:
    """Why flex cannot run `op` with these inputs, or None.

    meta: device, dtype, head_dim, group (Hq // Hkv), block_size (other keys are ignored).
    """
    device = torch.device(meta.get("device", "cpu"))
    if device.type not in ("cpu", "cuda"):
        return f"the flex backend runs on CPU and CUDA, not on {device.type}"
    if op.endswith("_decode"):
        return None  # plain torch on the one query row
    dtype, head_dim = _dtype(meta.get("dtype")), meta.get("head_dim")
    block_size = meta.get("block_size")
    if device.type == "cuda":
        if dtype is not None and dtype not in _DTYPES_CUDA:
            return f"FlexAttention on CUDA runs float16, bfloat16 and float32, not {dtype}"
        if head_dim is not None and not 16 <= int(head_dim) <= 256:
            return f"FlexAttention on CUDA needs a head dim between 16 and 256, got {head_dim}"
        if block_size is not None and (int(block_size) < 16 or int(block_size) & (int(block_size) - 1)):
            return f"FlexAttention tiles need a block_size that is a power of two >= 16, got {block_size}"
    return None


__all__ = [
    "full_attention_fwd", "full_attention_bwd", "full_attention_decode", "full_attention_extend",
    "sparse_attention_fwd", "sparse_attention_bwd", "sparse_attention_decode", "sparse_attention_extend",
    "supports", "NAME", "scoring_chunk_elems",
]
