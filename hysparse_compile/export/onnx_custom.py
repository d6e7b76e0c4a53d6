"""`ops="custom"`: one ONNX node per HySparse op, in the `hysparse` domain (schemas: docs/onnx_ops.md).

    hysparse::FullAttention(q, k, v) -> (out, indices int32)
        block_size: int, topk: int, scale: float
    hysparse::SparseAttention(q, k_own, v_own, k_shared, v_shared, indices, gate_sparse, gate_swa, sinks) -> out
        block_size: int, window: int (0 = no SWA branch), scale: float, merge: int (1 = training-free single softmax),
        has_gate_sparse, has_gate_swa, has_sinks: int (0 = that input is a neutral filler)

Every input is always present (fixed arity: TensorRT plugins and most runtimes' custom-op APIs want it): an absent
gate is a `[1, 1, 1, 1]` tensor of ones and absent sinks are `[Hq]` of -inf, neutral in the math, and the `has_*`
flags say so, so a runtime may skip the work. The nodes are made with `torch.onnx.ops.symbolic` while the graph is
captured; everything else in the graph is standard ONNX.

`reference_ops()` gives Python implementations of both nodes for `onnx.reference.ReferenceEvaluator` (they call the
reference backend), so a custom-domain file runs without any plugin:

    >>> from onnx.reference import ReferenceEvaluator                                  # doctest: +SKIP
    >>> sess = ReferenceEvaluator("model.onnx", new_ops=reference_ops())               # doctest: +SKIP
    >>> logits, = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})   # doctest: +SKIP
"""
from __future__ import annotations

import torch
from torch import Tensor

from .decompositions import _like_q

DOMAIN = "hysparse"
VERSION = 1
FULL_ATTENTION, SPARSE_ATTENTION = "FullAttention", "SparseAttention"
SPARSE_INPUTS = ("q", "k_own", "v_own", "k_shared", "v_shared", "indices", "gate_sparse", "gate_swa", "sinks")


def full_attention_node(q: Tensor, k: Tensor, v: Tensor, block_size: int, topk: int, scale: float,
                        return_scores: bool, backend: str = "auto"):
    """`hysparse::full_attention` as one `hysparse::FullAttention` node (same outputs as the op; `lse` is a dummy
    that inference graphs never read)."""
    if return_scores:
        raise ValueError("ops='custom': FullAttention has no block-scores output (return_scores=True was traced)")
    B, Hq, T, d = q.shape
    out, indices = torch.onnx.ops.symbolic_multi_out(
        f"{DOMAIN}::{FULL_ATTENTION}", [q, k, v],
        attrs={"block_size": int(block_size), "topk": int(topk), "scale": float(scale)},
        dtypes=[q.dtype, torch.int32], shapes=[q.shape, [B, k.shape[1], T, topk // block_size]], version=VERSION)
    lse = q.new_zeros((B, Hq, T), dtype=torch.float32)
    return _like_q(out, q), indices, lse, q.new_empty(0, dtype=torch.float32)


def sparse_inputs(q: Tensor, k_own, v_own, k_shared, v_shared, indices, gate_sparse, gate_swa, sinks):
    """The fixed-arity input list and the `has_*` flags: absent gates -> ones [1, 1, 1, 1], absent sinks -> -inf."""
    ones = torch.ones((1, 1, 1, 1), dtype=q.dtype, device=q.device)
    no_sinks = torch.full((q.shape[1],), float("-inf"), dtype=q.dtype, device=q.device)
    flags = {"has_gate_sparse": int(gate_sparse is not None), "has_gate_swa": int(gate_swa is not None),
             "has_sinks": int(sinks is not None)}
    inputs = [q, k_own, v_own, k_shared, v_shared, indices, ones if gate_sparse is None else gate_sparse,
              ones if gate_swa is None else gate_swa, no_sinks if sinks is None else sinks.to(q.dtype)]
    return inputs, flags


def sparse_attention_node(q: Tensor, k_own: Tensor, v_own: Tensor, k_shared: Tensor, v_shared: Tensor,
                          indices: Tensor, gate_sparse, gate_swa, sinks, block_size: int, window: int, scale: float,
                          merge: bool, save_branches: bool, backend: str = "auto"):
    """`hysparse::sparse_attention` as one `hysparse::SparseAttention` node (`lse`, `branch_out`: dummies)."""
    B, Hq, T, d = q.shape
    inputs, flags = sparse_inputs(q, k_own, v_own, k_shared, v_shared, indices, gate_sparse, gate_swa, sinks)
    attrs = {"block_size": int(block_size), "window": int(window), "scale": float(scale), "merge": int(merge),
             **flags}
    out = torch.onnx.ops.symbolic(f"{DOMAIN}::{SPARSE_ATTENTION}", inputs, attrs, dtype=q.dtype, shape=q.shape,
                                  version=VERSION)
    lse = q.new_zeros((B, Hq, T, 2), dtype=torch.float32)
    return _like_q(out, q), lse, q.new_empty(0)


def replacements() -> dict:
    """The capture-time op table for `ops="custom"`."""
    return {torch.ops.hysparse.full_attention.default: full_attention_node,
            torch.ops.hysparse.sparse_attention.default: sparse_attention_node}


# ---------------------------------------------------------------------------------------------- Python runtime
def run_sparse_attention(q, k_own, v_own, k_shared, v_shared, indices, gate_sparse, gate_swa, sinks, *, block_size,
                         window, scale, merge, has_gate_sparse=1, has_gate_swa=1, has_sinks=1):
    """The `SparseAttention` node's semantics on torch tensors (reference backend): what a runtime implements."""
    from ..kernels import reference

    B, Hq, T, d = q.shape
    expand = lambda g: g.expand(B, Hq, T, 1 if g.shape[-1] == 1 else d)  # noqa: E731
    gate_sparse = expand(gate_sparse) if has_gate_sparse and not merge else None
    gate_swa = expand(gate_swa) if has_gate_swa and not merge and window else None
    sinks = sinks if has_sinks else None
    out, _, _ = reference.sparse_attention_fwd(q, k_own, v_own, k_shared, v_shared, indices, gate_sparse, gate_swa,
                                               sinks, int(block_size), int(window), float(scale), bool(merge), False)
    return out


def reference_ops() -> list:
    """`onnx.reference.op_run.OpRun` classes for both nodes (pass as `ReferenceEvaluator(..., new_ops=...)`)."""
    import numpy as np
    from onnx.reference.op_run import OpRun

    from ..kernels import reference

    def tensor(x):
        return torch.from_numpy(np.array(x, copy=True))

    class FullAttention(OpRun):
        op_domain = DOMAIN

        def _run(self, q, k, v, block_size=None, topk=None, scale=None, **plugin_fields):
            out, indices, _, _ = reference.full_attention_fwd(tensor(q), tensor(k), tensor(v), int(block_size),
                                                              int(topk), float(scale), False)
            return out.numpy(), indices.numpy()

    class SparseAttention(OpRun):
        op_domain = DOMAIN

        def _run(self, *inputs, block_size=None, window=None, scale=None, merge=None, has_gate_sparse=None,
                 has_gate_swa=None, has_sinks=None, **plugin_fields):
            out = run_sparse_attention(*(tensor(x) for x in inputs), block_size=block_size, window=window,
                                       scale=scale, merge=merge, has_gate_sparse=has_gate_sparse,
                                       has_gate_swa=has_gate_swa, has_sinks=has_sinks)
            return (out.numpy(),)

    return [FullAttention, SparseAttention]


def _gather_elements():
    """ONNX GatherElements with `np.take_along_axis`: onnx.reference's own uses `np.choose`, which refuses axes
    longer than 64 (the padding roll gathers along the sequence)."""
    import numpy as np
    from onnx.reference.op_run import OpRun

    class GatherElements(OpRun):
        def _run(self, data, indices, axis=0):
            indices = np.where(indices < 0, indices + data.shape[axis], indices)
            return (np.take_along_axis(data, indices, axis=axis),)

    return GatherElements


def run_reference_evaluator(path, inputs: dict) -> torch.Tensor:
    """Run a custom-domain file in Python (`onnx.reference` + `reference_ops()`): -> the first output."""
    from onnx.reference import ReferenceEvaluator

    session = ReferenceEvaluator(str(path), new_ops=[*reference_ops(), _gather_elements()])
    feed = {name: inputs[name].cpu().numpy() for name in session.input_names}
    return torch.from_numpy(session.run(None, feed)[0])
