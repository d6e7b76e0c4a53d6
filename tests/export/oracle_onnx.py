"""Python implementations of the four `hysparse` ONNX nodes for `onnx.reference.ReferenceEvaluator`, written from the
contract in docs/onnx_ops.md on top of the float64 oracle (tests/oracle.py, tests/oracle_model.py), independently of
the package (never imports `hysparse_compile`: its own `onnx_custom.reference_ops()` call the reference backend, so
running a file with them compares the op with itself).

A strict runtime: it honours the `has_*` flags, and checks that an input the flags call absent is the documented
neutral filler (gates `[1, 1, 1, 1]` of ones, sinks `[Hq]` of -inf), so a wrong flag or a wrong filler fails.
Float outputs are returned in q's dtype, indices as int32.
"""
from __future__ import annotations

import numpy as np
import torch
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun
from oracle import oracle_full, oracle_sparse
from oracle_model import full_decode, sparse_decode

DOMAIN = "hysparse"


def _t(x) -> torch.Tensor:
    return torch.from_numpy(np.array(x, copy=True))


def _plain(extra_inputs=(), softcap=None, **plugin_fields):
    """This oracle implements the nodes as docs/onnx_ops.md had them when it was written: no logit softcap, no sinks
    on full layers. Refuse anything else rather than compute it wrongly (`plugin_namespace` / `plugin_version` are
    TensorRT's and do not change the math)."""
    if extra_inputs or softcap:
        raise NotImplementedError(f"oracle_onnx: extra inputs {len(extra_inputs)} / softcap {softcap!r} not modelled")
    unknown = set(plugin_fields) - {"plugin_namespace", "plugin_version"}
    if unknown:
        raise NotImplementedError(f"oracle_onnx: unknown attributes {sorted(unknown)}")


def _optional(gate_sparse, gate_swa, sinks, has_gate_sparse, has_gate_swa, has_sinks, merge, window):
    """The optional inputs as the oracle takes them (None where absent), after checking the fillers."""
    out = []
    for x, present, filler in ((gate_sparse, has_gate_sparse, 1.0), (gate_swa, has_gate_swa, 1.0),
                               (sinks, has_sinks, float("-inf"))):
        if not present:
            assert bool((x == filler).all()), f"an input flagged absent is not the neutral filler {filler}: {x}"
        out.append(x if present else None)
    gs, gw, sinks = out
    if merge:  # gates are not read
        gs = gw = None
    if not window:
        gw = None
    return gs, gw, sinks


class FullAttention(OpRun):
    op_domain = DOMAIN

    def _run(self, q, k, v, *extra, block_size=None, topk=None, scale=None, **attrs):
        _plain(extra, **attrs)
        out, _, indices = oracle_full(_t(q), _t(k), _t(v), int(block_size), int(topk), float(scale))
        return out.numpy().astype(q.dtype), indices.numpy().astype(np.int32)


class SparseAttention(OpRun):
    op_domain = DOMAIN

    def _run(self, q, k_own, v_own, k_shared, v_shared, indices, gate_sparse, gate_swa, sinks, block_size=None,
             window=None, scale=None, merge=None, has_gate_sparse=None, has_gate_swa=None, has_sinks=None,
             **attrs):
        _plain(**attrs)
        gs, gw, s = _optional(_t(gate_sparse), _t(gate_swa), _t(sinks), has_gate_sparse, has_gate_swa, has_sinks,
                              merge, window)
        out = oracle_sparse(_t(q), _t(k_own), _t(v_own), _t(k_shared), _t(v_shared), _t(indices).long(),
                            int(block_size), int(window) or None, gs, gw, s, float(scale), bool(merge))
        return (out.numpy().astype(q.dtype),)


class FullAttentionDecode(OpRun):
    op_domain = DOMAIN

    def _run(self, q, k_cache, v_cache, cache_len, *extra, block_size=None, topk=None, scale=None, **attrs):
        _plain(extra, **attrs)
        assert cache_len.dtype == np.int32, cache_len.dtype
        out, indices = full_decode(_t(q), _t(k_cache), _t(v_cache), _t(cache_len), int(block_size), int(topk),
                                   float(scale))
        return out.numpy().astype(q.dtype), indices.numpy().astype(np.int32)


class SparseAttentionDecode(OpRun):
    op_domain = DOMAIN

    def _run(self, q, k_win, v_win, k_shared, v_shared, indices, cache_len, gate_sparse, gate_swa, sinks,
             block_size=None, window=None, scale=None, merge=None, has_gate_sparse=None, has_gate_swa=None,
             has_sinks=None, **attrs):
        _plain(**attrs)
        assert cache_len.dtype == np.int32, cache_len.dtype
        gs, gw, s = _optional(_t(gate_sparse), _t(gate_swa), _t(sinks), has_gate_sparse, has_gate_swa, has_sinks,
                              merge, window)
        out = sparse_decode(_t(q), _t(k_win), _t(v_win), _t(k_shared), _t(v_shared), _t(indices).long(),
                            _t(cache_len), int(block_size), int(window) or None, gs, gw, s, float(scale), bool(merge))
        return (out.numpy().astype(q.dtype),)


class GatherElements(OpRun):
    """Standard ONNX GatherElements with `np.take_along_axis` (onnx.reference's own uses `np.choose`, which refuses
    axes longer than 64; the exported graphs' padding roll gathers along the sequence)."""

    def _run(self, data, indices, axis=0):
        indices = np.where(indices < 0, indices + data.shape[axis], indices)
        return (np.take_along_axis(data, indices, axis=axis),)


OPS = [FullAttention, SparseAttention, FullAttentionDecode, SparseAttentionDecode, GatherElements]


def oracle_session(path) -> ReferenceEvaluator:
    """A ReferenceEvaluator for a custom-domain file with the oracle's nodes."""
    return ReferenceEvaluator(str(path), new_ops=OPS)
