"""The HySparse ops in plain, traceable PyTorch: the one statement of their math (docs/design.md, "Ops").

It is the reference backend (`kernels/reference`, which runs it in query chunks and differentiates it with
autograd), the export decomposition (`export/decompositions.py`: standard ONNX and AOTI files compile these
functions), and the runtime's extend math. Every fused kernel is tested against it and against the float64 oracle
of the test suite, which is written independently (tests/oracle.py never imports this package).

    >>> import torch
    >>> from hysparse_compile.kernels import naive
    >>> from hysparse_compile.kernels.params import FullParams
    >>> q, k = torch.randn(1, 4, 40, 16), torch.randn(1, 2, 40, 16)
    >>> out, idx, lse, _ = naive.full_attention(q, k, k, None, FullParams(16, 32, 0.25))
    >>> idx.shape
    torch.Size([1, 2, 40, 2])
"""
from .common import (block_key_mask, block_max, block_table, compute_dtype, grouped, logits, ring_positions,
                     select_blocks, selected_keys, softmax_with_sink, window_keys)
from .full_attention import (attend_rows, extend_positions, full_attention, full_attention_decode,
                             full_attention_extend, full_rows)
from .sparse_attention import sparse_attention, sparse_attention_decode, sparse_attention_extend, sparse_rows

__all__ = [
    "full_attention", "full_attention_decode", "full_attention_extend", "full_rows", "attend_rows",
    "sparse_attention", "sparse_attention_decode", "sparse_attention_extend", "sparse_rows",
    "block_key_mask", "block_max", "block_table", "compute_dtype", "grouped", "logits", "ring_positions", "select_blocks",
    "selected_keys", "softmax_with_sink", "window_keys", "extend_positions",
]
