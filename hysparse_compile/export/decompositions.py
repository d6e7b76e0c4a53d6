"""The HySparse ops as plain ATen-level torch, for exporters that cannot call back into Python: the naive math
(`kernels/naive`) under each op's schema.

`ep.run_decompositions(DECOMPOSITIONS)` replaces every `hysparse::*` node of an ExportedProgram (prefill, decode and
extend ops) with these functions' ops, so the graph holds only standard ATen ops: torch.onnx turns them into
standard ONNX ops (`ops="standard"`), AOTInductor compiles them into a CPU package. (The exporters apply the same
table while capturing: `program.replace_ops`.)

The naive math is one tensor expression over the whole sequence (no query chunks, no Python loops, no
data-dependent shapes), so one traced graph serves every batch and length; the price is memory: each layer
materializes its `[B, Hq, T, T]` logits (the kernels never do). Outputs come back in q's dtype and memory layout,
as the ops' fake implementations declare them (`empty_like(q)`): code after the op may `view` them accordingly.

    >>> import torch
    >>> from hysparse_compile.export.decompositions import DECOMPOSITIONS
    >>> sorted(str(op) for op in DECOMPOSITIONS)[:2]
    ['hysparse.full_attention.default', 'hysparse.full_attention_decode.default']
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..kernels import naive, ops
from ..kernels.naive import select_blocks  # noqa: F401  (the selection every exporter writes: tests use it here)


def like_q(x: Tensor, q: Tensor) -> Tensor:
    """x [B, Hq, T, d] in q's dtype and memory layout, as the ops' fake implementations return it
    (`empty_like(q)`). (`aten.copy` is the functional copy: decomposition tables may not mutate.)"""
    return torch.ops.aten.copy.default(torch.empty_like(q), x)


def full_attention(*args, **kwargs):
    """`hysparse::full_attention` as plain torch: out [B, Hq, T, d], indices int32 [B, Hkv, T, nsel], lse float32
    [B, Hq, T], scores float32 [B, Hq, T, nb] (or empty). The backend argument is ignored."""
    c = ops.bind("full_attention", args, kwargs)
    out, indices, lse, scores = naive.full_attention(c.q, c.k, c.v, c.sinks, c.params, c.return_scores)
    return like_q(out, c.q), indices, lse, scores


def sparse_attention(*args, **kwargs):
    """`hysparse::sparse_attention` as plain torch: out [B, Hq, T, d], lse float32 [B, Hq, T, 2], branch_out
    [2, B, Hq, T, d] (ungated sparse/merged and SWA outputs) when save_branches, else empty."""
    c = ops.bind("sparse_attention", args, kwargs)
    out, lse, branches = naive.sparse_attention(c.q, c.k_own, c.v_own, c.k_shared, c.v_shared, c.indices,
                                                c.gate_sparse, c.gate_swa, c.sinks, c.params, c.save_branches)
    return like_q(out, c.q), lse, branches


def full_attention_decode(*args, **kwargs):
    """`hysparse::full_attention_decode` as plain torch: the new token at position cache_len - 1."""
    c = ops.bind("full_attention_decode", args, kwargs)
    out, indices = naive.full_attention_decode(c.q, c.k_cache, c.v_cache, c.cache_len, c.sinks, c.params)
    return like_q(out, c.q), indices


def sparse_attention_decode(*args, **kwargs):
    """`hysparse::sparse_attention_decode` as plain torch (docs/design.md, Decode): the new token at cache_len - 1."""
    c = ops.bind("sparse_attention_decode", args, kwargs)
    return like_q(naive.sparse_attention_decode(c.q, c.k_win, c.v_win, c.k_shared, c.v_shared, c.indices,
                                                c.cache_len, c.gate_sparse, c.gate_swa, c.sinks, c.params), c.q)


def full_attention_extend(*args, **kwargs):
    """`hysparse::full_attention_extend` as plain torch: R new tokens at positions start + r."""
    c = ops.bind("full_attention_extend", args, kwargs)
    out, indices = naive.full_attention_extend(c.q, c.k_cache, c.v_cache, c.start, c.sinks, c.params)
    return like_q(out, c.q), indices


def sparse_attention_extend(*args, **kwargs):
    """`hysparse::sparse_attention_extend` as plain torch."""
    c = ops.bind("sparse_attention_extend", args, kwargs)
    return like_q(naive.sparse_attention_extend(c.q, c.k_shared, c.v_shared, c.indices, c.k_win, c.v_win, c.win_pos,
                                                c.start, c.gate_sparse, c.gate_swa, c.sinks, c.params), c.q)


DECOMPOSITIONS = {
    torch.ops.hysparse.full_attention.default: full_attention,
    torch.ops.hysparse.sparse_attention.default: sparse_attention,
    torch.ops.hysparse.full_attention_decode.default: full_attention_decode,
    torch.ops.hysparse.sparse_attention_decode.default: sparse_attention_decode,
    torch.ops.hysparse.full_attention_extend.default: full_attention_extend,
    torch.ops.hysparse.sparse_attention_extend.default: sparse_attention_extend,
}
