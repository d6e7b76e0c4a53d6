"""`ops="custom"`: one ONNX node per HySparse op, in the `hysparse` domain (schemas: docs/onnx_ops.md).

    hysparse::FullAttention(q, k, v[, sinks]) -> (out, indices int32)
        block_size: int, topk: int, scale: float[, softcap: float]
    hysparse::SparseAttention(q, k_own, v_own, k_shared, v_shared, indices, gate_sparse, gate_swa, sinks) -> out
        block_size: int, window: int (0 = no SWA branch), scale: float, merge: int (1 = training-free single softmax),
        has_gate_sparse, has_gate_swa, has_sinks: int (0 = that input is a neutral filler)[, softcap: float]
    hysparse::FullAttentionDecode(q, k_cache, v_cache, cache_len[, sinks]) -> (out, indices int32)  (decode graphs)
        block_size, topk, scale[, softcap]
    hysparse::SparseAttentionDecode(q, k_win, v_win, k_shared, v_shared, indices, cache_len, gate_sparse, gate_swa,
                                    sinks) -> out                                                 (decode graphs)
        block_size, window, scale, merge, has_gate_sparse, has_gate_swa, has_sinks[, softcap]

The sparse nodes have fixed arity (TensorRT plugins and most runtimes' custom-op APIs want it): an absent gate is a
`[1, 1, 1, 1]` tensor of ones and absent sinks are `[Hq]` of -inf, neutral in the math, and the `has_*` flags say
so, so a runtime may skip the work. What later versions of the ops added is written only where a layer has it, so
a file without it is the file it always was: the full nodes' `sinks` input (a per-head sink logit, gpt-oss) and the
`softcap` attribute of every node (logits -> softcap * tanh(logits / softcap), Gemma 2; absent = off). The nodes
are made with `torch.onnx.ops.symbolic` while the graph is captured; everything else in the graph is standard ONNX.

`reference_ops()` gives Python implementations of the nodes for `onnx.reference.ReferenceEvaluator` (they call the
reference backend), so a custom-domain file runs without any plugin:

    >>> from onnx.reference import ReferenceEvaluator                                  # doctest: +SKIP
    >>> sess = ReferenceEvaluator("model.onnx", new_ops=reference_ops())               # doctest: +SKIP
    >>> logits, = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})   # doctest: +SKIP
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..kernels import ops as hs_ops
from .decompositions import like_q

DOMAIN = "hysparse"
VERSION = 1
FULL_ATTENTION, SPARSE_ATTENTION = "FullAttention", "SparseAttention"
FULL_DECODE, SPARSE_DECODE = "FullAttentionDecode", "SparseAttentionDecode"
SPARSE_INPUTS = ("q", "k_own", "v_own", "k_shared", "v_shared", "indices", "gate_sparse", "gate_swa", "sinks")
SPARSE_DECODE_INPUTS = ("q", "k_win", "v_win", "k_shared", "v_shared", "indices", "cache_len", "gate_sparse",
                        "gate_swa", "sinks")


def _softcap(attrs: dict, softcap: float) -> dict:
    return {**attrs, "softcap": float(softcap)} if softcap else attrs


def _full_node(name: str, inputs: list, c, rows: int):
    """One FullAttention(Decode) node: its inputs (+ sinks when the layer has them), out like q, indices int32."""
    q, p = c.q, c.params
    sinks = [] if c.sinks is None else [c.sinks.to(q.dtype)]
    attrs = _softcap({"block_size": p.block_size, "topk": p.topk, "scale": float(p.scale)}, p.softcap)
    B, Hkv = q.shape[0], inputs[1].shape[1]
    return torch.onnx.ops.symbolic_multi_out(f"{DOMAIN}::{name}", inputs + sinks, attrs=attrs,
                                             dtypes=[q.dtype, torch.int32], shapes=[q.shape, [B, Hkv, rows, p.nsel]],
                                             version=VERSION)


def full_attention_node(*args, **kwargs):
    """`hysparse::full_attention` as one `hysparse::FullAttention` node (same outputs as the op; `lse` is a dummy
    that inference graphs never read)."""
    c = hs_ops.bind("full_attention", args, kwargs)
    if c.return_scores:
        raise ValueError("ops='custom': FullAttention has no block-scores output (return_scores=True was traced)")
    B, Hq, T, d = c.q.shape
    out, indices = _full_node(FULL_ATTENTION, [c.q, c.k, c.v], c, T)
    return like_q(out, c.q), indices, c.q.new_zeros((B, Hq, T), dtype=torch.float32), \
        c.q.new_empty(0, dtype=torch.float32)


def sparse_inputs(q: Tensor, k_own, v_own, k_shared, v_shared, indices, gate_sparse, gate_swa, sinks):
    """The fixed-arity input list and the `has_*` flags: absent gates -> ones [1, 1, 1, 1], absent sinks -> -inf."""
    ones = torch.ones((1, 1, 1, 1), dtype=q.dtype, device=q.device)
    no_sinks = torch.full((q.shape[1],), float("-inf"), dtype=q.dtype, device=q.device)
    flags = {"has_gate_sparse": int(gate_sparse is not None), "has_gate_swa": int(gate_swa is not None),
             "has_sinks": int(sinks is not None)}
    inputs = [q, k_own, v_own, k_shared, v_shared, indices, ones if gate_sparse is None else gate_sparse,
              ones if gate_swa is None else gate_swa, no_sinks if sinks is None else sinks.to(q.dtype)]
    return inputs, flags


def _sparse_node(name: str, inputs: list, flags: dict, c):
    p = c.params
    attrs = _softcap({"block_size": p.block_size, "window": p.window, "scale": float(p.scale), "merge": int(p.merge),
                      **flags}, p.softcap)
    return torch.onnx.ops.symbolic(f"{DOMAIN}::{name}", inputs, attrs, dtype=c.q.dtype, shape=c.q.shape,
                                   version=VERSION)


def sparse_attention_node(*args, **kwargs):
    """`hysparse::sparse_attention` as one `hysparse::SparseAttention` node (`lse`, `branch_out`: dummies)."""
    c = hs_ops.bind("sparse_attention", args, kwargs)
    B, Hq, T, d = c.q.shape
    inputs, flags = sparse_inputs(c.q, c.k_own, c.v_own, c.k_shared, c.v_shared, c.indices, c.gate_sparse,
                                  c.gate_swa, c.sinks)
    out = _sparse_node(SPARSE_ATTENTION, inputs, flags, c)
    return like_q(out, c.q), c.q.new_zeros((B, Hq, T, 2), dtype=torch.float32), c.q.new_empty(0)


def full_attention_decode_node(*args, **kwargs):
    """`hysparse::full_attention_decode` as one `hysparse::FullAttentionDecode` node (cache_len int32 [B])."""
    c = hs_ops.bind("full_attention_decode", args, kwargs)
    out, indices = _full_node(FULL_DECODE, [c.q, c.k_cache, c.v_cache, c.cache_len.to(torch.int32)], c, 1)
    return like_q(out, c.q), indices


def sparse_attention_decode_node(*args, **kwargs):
    """`hysparse::sparse_attention_decode` as one `hysparse::SparseAttentionDecode` node (fillers as in
    `sparse_inputs`)."""
    c = hs_ops.bind("sparse_attention_decode", args, kwargs)
    inputs, flags = sparse_inputs(c.q, c.k_win, c.v_win, c.k_shared, c.v_shared, c.indices, c.gate_sparse,
                                  c.gate_swa, c.sinks)
    inputs.insert(6, c.cache_len.to(torch.int32))
    return like_q(_sparse_node(SPARSE_DECODE, inputs, flags, c), c.q)


def replacements() -> dict:
    """The capture-time op table for `ops="custom"` (prefill and decode ops)."""
    return {torch.ops.hysparse.full_attention.default: full_attention_node,
            torch.ops.hysparse.sparse_attention.default: sparse_attention_node,
            torch.ops.hysparse.full_attention_decode.default: full_attention_decode_node,
            torch.ops.hysparse.sparse_attention_decode.default: sparse_attention_decode_node}


# ---------------------------------------------------------------------------------------------- Python runtime
def node_gates(gate_sparse, gate_swa, sinks, merge, window, has_gate_sparse, has_gate_swa, has_sinks, shape):
    """The optional inputs of a SparseAttention(Decode) node as the op takes them (fillers -> None)."""
    B, Hq, T, d = shape
    expand = lambda g: g.expand(B, Hq, T, 1 if g.shape[-1] == 1 else d)  # noqa: E731
    return (expand(gate_sparse) if has_gate_sparse and not merge else None,
            expand(gate_swa) if has_gate_swa and not merge and window else None,
            sinks if has_sinks else None)


def run_sparse_attention(q, k_own, v_own, k_shared, v_shared, indices, gate_sparse, gate_swa, sinks, *, block_size,
                         window, scale, merge, has_gate_sparse=1, has_gate_swa=1, has_sinks=1, softcap=0.0):
    """The `SparseAttention` node's semantics on torch tensors (reference backend): what a runtime implements."""
    from ..kernels import reference

    gate_sparse, gate_swa, sinks = node_gates(gate_sparse, gate_swa, sinks, merge, window, has_gate_sparse,
                                              has_gate_swa, has_sinks, q.shape)
    out, _, _ = reference.sparse_attention_fwd(q, k_own, v_own, k_shared, v_shared, indices, gate_sparse, gate_swa,
                                               sinks, int(block_size), int(window), float(scale), bool(merge), False,
                                               softcap=float(softcap))
    return out


def run_sparse_attention_decode(q, k_win, v_win, k_shared, v_shared, indices, cache_len, gate_sparse, gate_swa,
                                sinks, *, block_size, window, scale, merge, has_gate_sparse=1, has_gate_swa=1,
                                has_sinks=1, softcap=0.0):
    """The `SparseAttentionDecode` node's semantics on torch tensors (reference backend)."""
    from ..kernels import reference

    gate_sparse, gate_swa, sinks = node_gates(gate_sparse, gate_swa, sinks, merge, window, has_gate_sparse,
                                              has_gate_swa, has_sinks, q.shape)
    return reference.sparse_attention_decode(q, k_win, v_win, k_shared, v_shared, indices, cache_len, gate_sparse,
                                             gate_swa, sinks, int(block_size), int(window), float(scale),
                                             bool(merge), softcap=float(softcap))


def reference_ops() -> list:
    """`onnx.reference.op_run.OpRun` classes for the four nodes (pass as `ReferenceEvaluator(..., new_ops=...)`)."""
    import numpy as np
    from onnx.reference.op_run import OpRun

    from ..kernels import reference

    def tensor(x):
        return torch.from_numpy(np.array(x, copy=True))

    def sinks_of(extra):
        return tensor(extra[0]) if extra else None

    class FullAttention(OpRun):
        op_domain = DOMAIN

        def _run(self, q, k, v, *sinks, block_size=None, topk=None, scale=None, softcap=None, **plugin_fields):
            out, indices, _, _ = reference.full_attention_fwd(tensor(q), tensor(k), tensor(v), int(block_size),
                                                              int(topk), float(scale), False, sinks=sinks_of(sinks),
                                                              softcap=float(softcap or 0.0))
            return out.numpy(), indices.numpy()

    def sparse_op(name, run):
        """The two sparse nodes share their attributes; only the function behind them differs."""
        def _run(self, *inputs, block_size=None, window=None, scale=None, merge=None, has_gate_sparse=None,
                 has_gate_swa=None, has_sinks=None, softcap=None, **plugin_fields):
            out = run(*(tensor(x) for x in inputs), block_size=block_size, window=window, scale=scale, merge=merge,
                      has_gate_sparse=has_gate_sparse, has_gate_swa=has_gate_swa, has_sinks=has_sinks,
                      softcap=float(softcap or 0.0))
            return (out.numpy(),)

        return type(name, (OpRun,), {"op_domain": DOMAIN, "_run": _run})

    SparseAttention = sparse_op("SparseAttention", run_sparse_attention)

    class FullAttentionDecode(OpRun):
        op_domain = DOMAIN

        def _run(self, q, k_cache, v_cache, cache_len, *sinks, block_size=None, topk=None, scale=None, softcap=None,
                 **plugin_fields):
            out, indices = reference.full_attention_decode(tensor(q), tensor(k_cache), tensor(v_cache),
                                                           tensor(cache_len), int(block_size), int(topk),
                                                           float(scale), sinks=sinks_of(sinks),
                                                           softcap=float(softcap or 0.0))
            return out.numpy(), indices.numpy()

    SparseAttentionDecode = sparse_op("SparseAttentionDecode", run_sparse_attention_decode)

    return [FullAttention, SparseAttention, FullAttentionDecode, SparseAttentionDecode]


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


def reference_session(path):
    """An `onnx.reference.ReferenceEvaluator` for a custom-domain file (`reference_ops()` included)."""
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(str(path), new_ops=[*reference_ops(), _gather_elements()])


def run_reference_evaluator(path, inputs: dict, *, all_outputs: bool = False):
    """Run a custom-domain file in Python (`onnx.reference` + `reference_ops()`): -> the first output (or every
    output, as a tuple of tensors)."""
    session = reference_session(path)
    feed = {name: inputs[name].cpu().numpy() for name in session.input_names}
    outs = [torch.from_numpy(x) for x in session.run(None, feed)]
    return tuple(outs) if all_outputs else outs[0]
