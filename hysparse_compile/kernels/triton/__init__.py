"""The Triton backend: fused kernels for both HySparse ops (forward, backward, decode, extend). The default on CUDA.

Full layer: `full_attention.py` (flash forward with running per-head top-k of block maxima, GQA merge in
`select_blocks.py`, FA2-style backward; on CUDA the backward runs cuDNN's fused one where it applies,
`full_attention_bwd_cudnn.py`), `full_attention_decode.py` (split-K) and `full_attention_extend.py` (the
forward kernel with per-row start positions). Sparse layer: `sparse_attention.py` (both branches in one kernel over
the per-tile block union of `block_union.py`), `sparse_attention_bwd.py`, `sparse_attention_decode.py`,
`sparse_attention_extend.py` (the token-major tiling for R new rows, SWA keys found by position). The KV-cache
runtime's writes of decode and extend: `cache_write.py` (K and V of a layer in one launch). Shared constants and
helpers: `common.py`. Every kernel takes the op parameters' options (soft-capping; sinks on the full layer) as
constexpr flags. Design notes: docs/kernels_full.md, docs/kernels_sparse.md. The launchers (`launch_*`) are the
public way in for other code (export/aoti_triton.py); the kernels themselves are private to this folder.
"""
from .full_attention import full_attention_bwd, full_attention_fwd, full_attention_supports
from .full_attention_decode import full_attention_decode
from .full_attention_extend import full_attention_extend
from .sparse_attention import sparse_attention_fwd, sparse_attention_supports
from .sparse_attention_bwd import sparse_attention_bwd
from .sparse_attention_decode import sparse_attention_decode
from .sparse_attention_extend import sparse_attention_extend

NAME = "triton"


def supports(op: str, **meta) -> str | None:
    """Why the Triton kernels cannot run `op` for these inputs (see `backends.unsupported_reason`), or None."""
    return (full_attention_supports(op, **meta) if op.startswith("full_attention")
            else sparse_attention_supports(**{"op": op, **meta}))


__all__ = [
    "full_attention_fwd", "full_attention_bwd", "full_attention_decode", "full_attention_extend",
    "sparse_attention_fwd", "sparse_attention_bwd", "sparse_attention_decode", "sparse_attention_extend", "supports",
    "NAME",
]
