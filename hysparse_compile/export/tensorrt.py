"""`to_tensorrt`: the compiled model for TensorRT, two ways, both with one plugin per HySparse op.

TensorRT cannot be installed on the machines this project runs on (its wheels download from a host they cannot
reach), so what is tested here stops at TensorRT's door: the plugin schemas, their shape and dtype functions against
the ops' fake implementations, and the ONNX graph TensorRT's parser would read. docs/export.md says what was run.

**The plugins** (TensorRT >= 10.7 Quick Deployable Plugins, `register_plugins()`): `hysparse::FullAttention` and
`hysparse::SparseAttention`, and for decode graphs `hysparse::FullAttentionDecode` and
`hysparse::SparseAttentionDecode`, with exactly the inputs, outputs and attributes of the custom-domain ONNX nodes
(docs/onnx_ops.md); every one has a `softcap` attribute (0 = off). A full layer with per-head sinks has one more
input, which a fixed-arity plugin cannot make optional: it is its own plugin, `FullAttentionSinks` /
`FullAttentionDecodeSinks` (q, k, v, sinks, ...), and `plugin_onnx` names the ONNX nodes that carry sinks so. Their torch twins `torch.ops.hysparse.FullAttention` / `SparseAttention` (fixed arity, only
Tensor/int/float arguments, as TensorRT plugins need) are registered here; their implementations call the HySparse
ops, so inside an engine the plugin runs the `auto` backend (the Triton kernels on a GPU) through Python (JIT QDP).

- `via="torch_tensorrt"`: capture with the twins in place of the HySparse ops, `generate_plugin_converter` for both,
  `torch_tensorrt.dynamo.compile`, saved with `torch_tensorrt.save`. The hand-written descriptor functions declare
  the int32 `indices` output (Torch-TensorRT's generated plugins copy the first input's dtype to every output).
- `via="onnx"`: the `ops="custom"` ONNX file, each HySparse node carrying `plugin_namespace="hysparse"` and
  `plugin_version="1"`: TensorRT's ONNX parser maps a node it does not know to the plugin named by its op type
  (namespace from the domain since TensorRT 10.10, from `plugin_namespace` before), other attributes become plugin
  fields. Build with `trtexec --onnx=model.onnx` in a process that ran `register_plugins()`.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor

from ..kernels import ops as hs_ops
from . import onnx_custom, program
from .program import ExportResult, Stage

log = logging.getLogger(__name__)

PLUGIN_NAMESPACE, PLUGIN_VERSION = onnx_custom.DOMAIN, "1"
NOT_INSTALLABLE = ("TensorRT is not installed (and cannot be on the machines this project is tested on: its wheels "
                   "download from a host they cannot reach); install tensorrt>=10.7 and torch-tensorrt on a machine "
                   "with an NVIDIA GPU, or use via='onnx' to write the plugin-ready ONNX file")
VIAS = ("torch_tensorrt", "onnx")


# ---------------------------------------------------------------------------------------------- shapes and dtypes
def full_attention_shapes(q_shape, k_shape, block_size: int, topk: int) -> list[tuple[tuple, str]]:
    """Output (shape, dtype) of `FullAttention`: out like q; indices int32 [B, Hkv, T, topk // block_size].
    Dims may be ints or TensorRT shape expressions (only indexing is used, and one int)."""
    return [(tuple(q_shape), "like q"), ((q_shape[0], k_shape[1], q_shape[2], topk // block_size), "int32")]


def sparse_attention_shapes(q_shape) -> list[tuple[tuple, str]]:
    """Output (shape, dtype) of `SparseAttention`: out like q."""
    return [(tuple(q_shape), "like q")]


# ---------------------------------------------------------------------------------------------- torch twins
@torch.library.custom_op("hysparse::FullAttention", mutates_args=())
def full_attention_plugin_op(q: Tensor, k: Tensor, v: Tensor, block_size: int, topk: int, scale: float,
                             softcap: float = 0.0) -> tuple[Tensor, Tensor]:
    """The `FullAttention` plugin's computation: `hysparse::full_attention` (auto backend) -> out, indices."""
    out, indices, _, _ = torch.ops.hysparse.full_attention(q, k, v, block_size, topk, scale, False, "auto",
                                                           None, softcap)
    return out, indices


@full_attention_plugin_op.register_fake
def _(q, k, v, block_size, topk, scale, softcap=0.0):
    (out_shape, _), (idx_shape, _) = full_attention_shapes(q.shape, k.shape, block_size, topk)
    return q.new_empty(out_shape), q.new_empty(idx_shape, dtype=torch.int32)


@torch.library.custom_op("hysparse::FullAttentionSinks", mutates_args=())
def full_attention_sinks_plugin_op(q: Tensor, k: Tensor, v: Tensor, sinks: Tensor, block_size: int, topk: int,
                                   scale: float, softcap: float = 0.0) -> tuple[Tensor, Tensor]:
    """The `FullAttentionSinks` plugin's computation: a full layer with per-head sinks [Hq]."""
    out, indices, _, _ = torch.ops.hysparse.full_attention(q, k, v, block_size, topk, scale, False, "auto",
                                                           sinks, softcap)
    return out, indices


@full_attention_sinks_plugin_op.register_fake
def _(q, k, v, sinks, block_size, topk, scale, softcap=0.0):
    (out_shape, _), (idx_shape, _) = full_attention_shapes(q.shape, k.shape, block_size, topk)
    return q.new_empty(out_shape), q.new_empty(idx_shape, dtype=torch.int32)


@torch.library.custom_op("hysparse::SparseAttention", mutates_args=())
def sparse_attention_plugin_op(q: Tensor, k_own: Tensor, v_own: Tensor, k_shared: Tensor, v_shared: Tensor,
                               indices: Tensor, gate_sparse: Tensor, gate_swa: Tensor, sinks: Tensor, block_size: int,
                               window: int, scale: float, merge: int, has_gate_sparse: int, has_gate_swa: int,
                               has_sinks: int, softcap: float = 0.0) -> Tensor:
    """The `SparseAttention` plugin's computation (absent gates / sinks per the `has_*` flags)."""
    gs, gw, sinks = onnx_custom.node_gates(gate_sparse, gate_swa, sinks, merge, window, has_gate_sparse,
                                           has_gate_swa, has_sinks, q.shape)
    out, _, _ = torch.ops.hysparse.sparse_attention(q, k_own, v_own, k_shared, v_shared, indices, gs, gw, sinks,
                                                    block_size, window, scale, bool(merge), False, "auto", softcap)
    return out


@sparse_attention_plugin_op.register_fake
def _(q, k_own, v_own, k_shared, v_shared, indices, gate_sparse, gate_swa, sinks, block_size, window, scale, merge,
      has_gate_sparse, has_gate_swa, has_sinks, softcap=0.0):
    ((shape, _),) = sparse_attention_shapes(q.shape)
    return q.new_empty(shape)


def _full(*args, **kwargs):
    c = hs_ops.bind("full_attention", args, kwargs)
    p = c.params
    if c.sinks is None:
        out, indices = torch.ops.hysparse.FullAttention(c.q, c.k, c.v, p.block_size, p.topk, float(p.scale),
                                                        p.softcap)
    else:
        out, indices = torch.ops.hysparse.FullAttentionSinks(c.q, c.k, c.v, c.sinks.to(c.q.dtype), p.block_size,
                                                             p.topk, float(p.scale), p.softcap)
    B, Hq, T, _ = c.q.shape
    return out, indices, c.q.new_zeros((B, Hq, T), dtype=torch.float32), c.q.new_empty(0, dtype=torch.float32)


def _sparse(*args, **kwargs):
    c = hs_ops.bind("sparse_attention", args, kwargs)
    p = c.params
    inputs, flags = onnx_custom.sparse_inputs(c.q, c.k_own, c.v_own, c.k_shared, c.v_shared, c.indices,
                                              c.gate_sparse, c.gate_swa, c.sinks)
    out = torch.ops.hysparse.SparseAttention(*inputs, p.block_size, p.window, float(p.scale), int(p.merge),
                                             flags["has_gate_sparse"], flags["has_gate_swa"], flags["has_sinks"],
                                             p.softcap)
    B, Hq, T, _ = c.q.shape
    return out, c.q.new_zeros((B, Hq, T, 2), dtype=torch.float32), c.q.new_empty(0)


# decode twins: the new token at cache_len - 1 (hysparse::*_decode), fixed arity like the prefill twins
@torch.library.custom_op("hysparse::FullAttentionDecode", mutates_args=())
def full_attention_decode_plugin_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_len: Tensor, block_size: int,
                                    topk: int, scale: float, softcap: float = 0.0) -> tuple[Tensor, Tensor]:
    """The `FullAttentionDecode` plugin's computation: `hysparse::full_attention_decode` (auto backend)."""
    return torch.ops.hysparse.full_attention_decode(q, k_cache, v_cache, cache_len, block_size, topk, scale, "auto",
                                                    None, softcap)


@full_attention_decode_plugin_op.register_fake
def _(q, k_cache, v_cache, cache_len, block_size, topk, scale, softcap=0.0):
    (out_shape, _), (idx_shape, _) = full_attention_shapes(q.shape, k_cache.shape, block_size, topk)
    return q.new_empty(out_shape), q.new_empty(idx_shape, dtype=torch.int32)


@torch.library.custom_op("hysparse::FullAttentionDecodeSinks", mutates_args=())
def full_attention_decode_sinks_plugin_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_len: Tensor,
                                          sinks: Tensor, block_size: int, topk: int, scale: float,
                                          softcap: float = 0.0) -> tuple[Tensor, Tensor]:
    """The `FullAttentionDecodeSinks` plugin's computation: a full layer's decode with per-head sinks [Hq]."""
    return torch.ops.hysparse.full_attention_decode(q, k_cache, v_cache, cache_len, block_size, topk, scale, "auto",
                                                    sinks, softcap)


@full_attention_decode_sinks_plugin_op.register_fake
def _(q, k_cache, v_cache, cache_len, sinks, block_size, topk, scale, softcap=0.0):
    (out_shape, _), (idx_shape, _) = full_attention_shapes(q.shape, k_cache.shape, block_size, topk)
    return q.new_empty(out_shape), q.new_empty(idx_shape, dtype=torch.int32)


@torch.library.custom_op("hysparse::SparseAttentionDecode", mutates_args=())
def sparse_attention_decode_plugin_op(q: Tensor, k_win: Tensor, v_win: Tensor, k_shared: Tensor, v_shared: Tensor,
                                      indices: Tensor, cache_len: Tensor, gate_sparse: Tensor, gate_swa: Tensor,
                                      sinks: Tensor, block_size: int, window: int, scale: float, merge: int,
                                      has_gate_sparse: int, has_gate_swa: int, has_sinks: int,
                                      softcap: float = 0.0) -> Tensor:
    """The `SparseAttentionDecode` plugin's computation (absent gates / sinks per the `has_*` flags)."""
    gs, gw, sinks = onnx_custom.node_gates(gate_sparse, gate_swa, sinks, merge, window, has_gate_sparse, has_gate_swa,
                                           has_sinks, q.shape)
    return torch.ops.hysparse.sparse_attention_decode(q, k_win, v_win, k_shared, v_shared, indices, cache_len, gs,
                                                      gw, sinks, block_size, window, scale, bool(merge), "auto",
                                                      softcap)


@sparse_attention_decode_plugin_op.register_fake
def _(q, k_win, v_win, k_shared, v_shared, indices, cache_len, gate_sparse, gate_swa, sinks, block_size, window,
      scale, merge, has_gate_sparse, has_gate_swa, has_sinks, softcap=0.0):
    ((shape, _),) = sparse_attention_shapes(q.shape)
    return q.new_empty(shape)


def _full_decode(*args, **kwargs):
    c = hs_ops.bind("full_attention_decode", args, kwargs)
    p, cache_len = c.params, c.cache_len.to(torch.int32)
    if c.sinks is None:
        return torch.ops.hysparse.FullAttentionDecode(c.q, c.k_cache, c.v_cache, cache_len, p.block_size, p.topk,
                                                      float(p.scale), p.softcap)
    return torch.ops.hysparse.FullAttentionDecodeSinks(c.q, c.k_cache, c.v_cache, cache_len, c.sinks.to(c.q.dtype),
                                                       p.block_size, p.topk, float(p.scale), p.softcap)


def _sparse_decode(*args, **kwargs):
    c = hs_ops.bind("sparse_attention_decode", args, kwargs)
    p = c.params
    inputs, flags = onnx_custom.sparse_inputs(c.q, c.k_win, c.v_win, c.k_shared, c.v_shared, c.indices,
                                              c.gate_sparse, c.gate_swa, c.sinks)
    inputs.insert(6, c.cache_len.to(torch.int32))
    return torch.ops.hysparse.SparseAttentionDecode(*inputs, p.block_size, p.window, float(p.scale), int(p.merge),
                                                    flags["has_gate_sparse"], flags["has_gate_swa"],
                                                    flags["has_sinks"], p.softcap)


PLUGINS = ("FullAttention", "FullAttentionSinks", "SparseAttention", "FullAttentionDecode",
           "FullAttentionDecodeSinks", "SparseAttentionDecode")
SINKS_PLUGIN = {"FullAttention": "FullAttentionSinks", "FullAttentionDecode": "FullAttentionDecodeSinks"}


def replacements() -> dict:
    """The capture-time op table for Torch-TensorRT: the HySparse ops (prefill and decode) -> fixed-arity twins."""
    return {torch.ops.hysparse.full_attention.default: _full, torch.ops.hysparse.sparse_attention.default: _sparse,
            torch.ops.hysparse.full_attention_decode.default: _full_decode,
            torch.ops.hysparse.sparse_attention_decode.default: _sparse_decode}


# ---------------------------------------------------------------------------------------------- TensorRT plugins
def register_plugins() -> None:
    """Register the QDP plugins with TensorRT (needs `tensorrt >= 10.7`); idempotent. Not run on this project's
    machines (no TensorRT); their shape functions and computations are the tested ones above."""
    try:
        import tensorrt as trt
        import tensorrt.plugin as trtp
    except ImportError as e:
        raise ImportError(NOT_INSTALLABLE) from e
    from tensorrt.plugin._lib import QDP_REGISTRY

    if f"{PLUGIN_NAMESPACE}::FullAttention" in QDP_REGISTRY:
        return

    def cuda(t):
        return torch.as_tensor(t, device="cuda")

    def run(op, tensors, attrs, outputs, stream):
        """The torch twin `op` on TensorRT's stream, written into TensorRT's outputs."""
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            results = op(*(cuda(t) for t in tensors), *attrs)
            for out, value in zip(outputs, results if isinstance(results, tuple) else (results,)):
                cuda(out).copy_(value)

    def full_desc(q, k, block_size, topk):
        _, (idx_shape, _) = full_attention_shapes(q.shape_expr, k.shape_expr, block_size, topk)
        return q.like(), trtp.from_shape_expr(idx_shape, dtype=trt.int32)

    @trtp.register(f"{PLUGIN_NAMESPACE}::FullAttention")
    def _full_desc(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, block_size: int, topk: int,
                   scale: float, softcap: float) -> tuple[trtp.TensorDesc, trtp.TensorDesc]:
        return full_desc(q, k, block_size, topk)

    @trtp.impl(f"{PLUGIN_NAMESPACE}::FullAttention")
    def _full_impl(q: trtp.Tensor, k: trtp.Tensor, v: trtp.Tensor, block_size: int, topk: int, scale: float,
                   softcap: float, outputs: tuple[trtp.Tensor, trtp.Tensor], stream: int) -> None:
        run(full_attention_plugin_op, (q, k, v), (block_size, topk, scale, softcap), outputs, stream)

    @trtp.register(f"{PLUGIN_NAMESPACE}::FullAttentionSinks")
    def _full_sinks_desc(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, sinks: trtp.TensorDesc,
                         block_size: int, topk: int, scale: float,
                         softcap: float) -> tuple[trtp.TensorDesc, trtp.TensorDesc]:
        return full_desc(q, k, block_size, topk)

    @trtp.impl(f"{PLUGIN_NAMESPACE}::FullAttentionSinks")
    def _full_sinks_impl(q: trtp.Tensor, k: trtp.Tensor, v: trtp.Tensor, sinks: trtp.Tensor, block_size: int,
                         topk: int, scale: float, softcap: float, outputs: tuple[trtp.Tensor, trtp.Tensor],
                         stream: int) -> None:
        run(full_attention_sinks_plugin_op, (q, k, v, sinks), (block_size, topk, scale, softcap), outputs, stream)

    @trtp.register(f"{PLUGIN_NAMESPACE}::SparseAttention")
    def _sparse_desc(q: trtp.TensorDesc, k_own: trtp.TensorDesc, v_own: trtp.TensorDesc, k_shared: trtp.TensorDesc,
                     v_shared: trtp.TensorDesc, indices: trtp.TensorDesc, gate_sparse: trtp.TensorDesc,
                     gate_swa: trtp.TensorDesc, sinks: trtp.TensorDesc, block_size: int, window: int, scale: float,
                     merge: int, has_gate_sparse: int, has_gate_swa: int, has_sinks: int,
                     softcap: float) -> trtp.TensorDesc:
        return q.like()

    @trtp.impl(f"{PLUGIN_NAMESPACE}::SparseAttention")
    def _sparse_impl(q: trtp.Tensor, k_own: trtp.Tensor, v_own: trtp.Tensor, k_shared: trtp.Tensor,
                     v_shared: trtp.Tensor, indices: trtp.Tensor, gate_sparse: trtp.Tensor, gate_swa: trtp.Tensor,
                     sinks: trtp.Tensor, block_size: int, window: int, scale: float, merge: int,
                     has_gate_sparse: int, has_gate_swa: int, has_sinks: int, softcap: float,
                     outputs: tuple[trtp.Tensor], stream: int) -> None:
        run(sparse_attention_plugin_op, (q, k_own, v_own, k_shared, v_shared, indices, gate_sparse, gate_swa, sinks),
            (block_size, window, scale, merge, has_gate_sparse, has_gate_swa, has_sinks, softcap), outputs, stream)

    @trtp.register(f"{PLUGIN_NAMESPACE}::FullAttentionDecode")
    def _full_decode_desc(q: trtp.TensorDesc, k_cache: trtp.TensorDesc, v_cache: trtp.TensorDesc,
                          cache_len: trtp.TensorDesc, block_size: int, topk: int, scale: float,
                          softcap: float) -> tuple[trtp.TensorDesc, trtp.TensorDesc]:
        return full_desc(q, k_cache, block_size, topk)

    @trtp.impl(f"{PLUGIN_NAMESPACE}::FullAttentionDecode")
    def _full_decode_impl(q: trtp.Tensor, k_cache: trtp.Tensor, v_cache: trtp.Tensor, cache_len: trtp.Tensor,
                          block_size: int, topk: int, scale: float, softcap: float,
                          outputs: tuple[trtp.Tensor, trtp.Tensor], stream: int) -> None:
        run(full_attention_decode_plugin_op, (q, k_cache, v_cache, cache_len), (block_size, topk, scale, softcap),
            outputs, stream)

    @trtp.register(f"{PLUGIN_NAMESPACE}::FullAttentionDecodeSinks")
    def _full_decode_sinks_desc(q: trtp.TensorDesc, k_cache: trtp.TensorDesc, v_cache: trtp.TensorDesc,
                                cache_len: trtp.TensorDesc, sinks: trtp.TensorDesc, block_size: int, topk: int,
                                scale: float, softcap: float) -> tuple[trtp.TensorDesc, trtp.TensorDesc]:
        return full_desc(q, k_cache, block_size, topk)

    @trtp.impl(f"{PLUGIN_NAMESPACE}::FullAttentionDecodeSinks")
    def _full_decode_sinks_impl(q: trtp.Tensor, k_cache: trtp.Tensor, v_cache: trtp.Tensor, cache_len: trtp.Tensor,
                                sinks: trtp.Tensor, block_size: int, topk: int, scale: float, softcap: float,
                                outputs: tuple[trtp.Tensor, trtp.Tensor], stream: int) -> None:
        run(full_attention_decode_sinks_plugin_op, (q, k_cache, v_cache, cache_len, sinks),
            (block_size, topk, scale, softcap), outputs, stream)

    @trtp.register(f"{PLUGIN_NAMESPACE}::SparseAttentionDecode")
    def _sparse_decode_desc(q: trtp.TensorDesc, k_win: trtp.TensorDesc, v_win: trtp.TensorDesc,
                            k_shared: trtp.TensorDesc, v_shared: trtp.TensorDesc, indices: trtp.TensorDesc,
                            cache_len: trtp.TensorDesc, gate_sparse: trtp.TensorDesc, gate_swa: trtp.TensorDesc,
                            sinks: trtp.TensorDesc, block_size: int, window: int, scale: float, merge: int,
                            has_gate_sparse: int, has_gate_swa: int, has_sinks: int,
                            softcap: float) -> trtp.TensorDesc:
        return q.like()

    @trtp.impl(f"{PLUGIN_NAMESPACE}::SparseAttentionDecode")
    def _sparse_decode_impl(q: trtp.Tensor, k_win: trtp.Tensor, v_win: trtp.Tensor, k_shared: trtp.Tensor,
                            v_shared: trtp.Tensor, indices: trtp.Tensor, cache_len: trtp.Tensor,
                            gate_sparse: trtp.Tensor, gate_swa: trtp.Tensor, sinks: trtp.Tensor, block_size: int,
                            window: int, scale: float, merge: int, has_gate_sparse: int, has_gate_swa: int,
                            has_sinks: int, softcap: float, outputs: tuple[trtp.Tensor], stream: int) -> None:
        run(sparse_attention_decode_plugin_op,
            (q, k_win, v_win, k_shared, v_shared, indices, cache_len, gate_sparse, gate_swa, sinks),
            (block_size, window, scale, merge, has_gate_sparse, has_gate_swa, has_sinks, softcap), outputs, stream)


def plugin_onnx(model) -> None:
    """Shape a custom-domain ONNX model for TensorRT's parser, in place: every `hysparse` node gets the string
    attributes `plugin_namespace` and `plugin_version` and a `softcap` (0.0 where the file leaves it out, as the
    plugins take one); a full node with a `sinks` input is renamed to its plugin (`FullAttentionSinks`,
    `FullAttentionDecodeSinks`)."""
    import onnx

    arity = {"FullAttention": 3, "FullAttentionDecode": 4}
    for node in model.graph.node:
        if node.domain == PLUGIN_NAMESPACE:
            if node.op_type in arity and len(node.input) > arity[node.op_type]:
                node.op_type = SINKS_PLUGIN[node.op_type]
            if "softcap" not in {a.name for a in node.attribute}:
                node.attribute.append(onnx.helper.make_attribute("softcap", 0.0))
            names = {a.name for a in node.attribute}
            for key, value in (("plugin_namespace", PLUGIN_NAMESPACE), ("plugin_version", PLUGIN_VERSION)):
                if key not in names:
                    node.attribute.append(onnx.helper.make_attribute(key, value))


# ---------------------------------------------------------------------------------------------- front door
def to_tensorrt(compiled, example_inputs, path, *, via: str = "torch_tensorrt", decode: bool = False,
                max_batch: int | None = None, max_seq_len: int | None = None, check: bool = True,
                stage: Stage | None = None) -> ExportResult:
    """Export a compiled HySparse model for TensorRT.

    via="torch_tensorrt": a Torch-TensorRT program (`torch_tensorrt.save`, `.ep`) built with the plugins; needs
    tensorrt >= 10.7 and torch-tensorrt (raises ImportError saying so otherwise) and a CUDA model. The optimization
    profile spans batch 1..max_batch (default max(B, 8)) and every sequence or cache-length axis
    1..max_seq_len (default max(T, 4096)).
    via="onnx": the custom-domain ONNX file shaped for TensorRT's ONNX parser (works without TensorRT; `check`
    runs it with the Python reference ops as `to_onnx(ops="custom")` does).
    decode: also the decode-step graph (`<stem>-decode<suffix>` beside `path`; `path` then holds the prefill that
    returns the cache), the graphs of `to_onnx(..., decode=True)`.
    """
    if via not in VIAS:
        raise ValueError(f"via must be 'torch_tensorrt' (Torch-TensorRT with plugins) or 'onnx' (the plugin-ready "
                         f"ONNX file for TensorRT's parser), got {via!r}")
    if not isinstance(decode, bool):
        raise TypeError(f"decode must be True or False, got {decode!r}")
    path = program.check_path(path)
    if via == "onnx":
        return _to_plugin_onnx(compiled, example_inputs, path, decode, check, stage)
    try:
        import torch_tensorrt
    except ImportError as e:
        raise ImportError(NOT_INSTALLABLE) from e
    register_plugins()
    from torch_tensorrt.dynamo.conversion.plugins import generate_plugin_converter

    for name in PLUGINS:
        generate_plugin_converter(f"{PLUGIN_NAMESPACE}::{name}", supports_dynamic_shapes=True)
    if decode:
        from . import onnx_decode

        graphs = list(zip(onnx_decode.capture(compiled, example_inputs, replacements(), stage),
                          (path, program.decode_path(path))))
    else:
        graphs = [(program.capture(compiled, example_inputs, replacements(), stage), path)]
    B, T = next(iter(graphs[0][0].example.values())).shape
    max_batch, max_seq_len = max_batch or max(B, 8), max_seq_len or max(T, 4096)
    checks = []
    with program.atomic_output(path) as tmp:
        for prog, final in graphs:
            if stage:
                stage(f"build the TensorRT engine for {final.name} (torch_tensorrt.dynamo.compile)")
            inputs = [torch_tensorrt.Input(name=name, dtype=x.dtype, **profile)
                      for (name, x), profile in zip(prog.example.items(), input_profiles(prog, max_batch,
                                                                                         max_seq_len))]
            trt_module = torch_tensorrt.dynamo.compile(prog.exported, arg_inputs=inputs, min_block_size=1)
            torch_tensorrt.save(trt_module, str(tmp.parent / final.name), output_format="exported_program",
                                arg_inputs=list(prog.example.values()))
            if check:
                with torch.no_grad():
                    got = program.as_tuple(trt_module(*prog.example.values()))
                checks.append(f"{final.name}: TensorRT vs PyTorch: max rel err "
                              f"{program.relative_error(got[0], prog.logits):.1e}")
    ops: dict[str, int] = {}
    for prog, _ in graphs:
        for op, n in program.graph_op_counts(prog.exported).items():
            ops[op] = ops.get(op, 0) + n
    return ExportResult(path, "tensorrt", tuple(f for _, f in graphs), ops, "; ".join(checks) or "not checked")


def input_profiles(prog: program.Program, max_batch: int, max_seq_len: int) -> list[dict]:
    """TensorRT optimization profiles (`min_shape`, `opt_shape`, `max_shape`) for the program's inputs: the example
    shape is `opt`; an axis the capture made dynamic spans 1..max_batch (axis 0) or 1..max_seq_len (any other: the
    sequence, or a full layer's cached length); static axes stay fixed."""
    by_name = {n.name: n for n in prog.exported.graph.nodes if n.op == "placeholder"}
    user = [by_name[name] for name in prog.exported.graph_signature.user_inputs]  # not the weights
    profiles = []
    for node, x in zip(user, prog.example.values()):
        dims = node.meta["val"].shape
        lo = tuple(1 if isinstance(d, torch.SymInt) else int(d) for d in dims)
        hi = tuple((max_batch if axis == 0 else max_seq_len) if isinstance(d, torch.SymInt) else int(d)
                   for axis, d in enumerate(dims))
        profiles.append({"min_shape": lo, "opt_shape": tuple(x.shape), "max_shape": hi})
    return profiles


def _to_plugin_onnx(compiled, example_inputs, path: Path, decode: bool, check: bool,
                    stage: Stage | None) -> ExportResult:
    import onnx

    from .onnx import op_counts, to_onnx

    counts: dict[str, int] = {}
    with program.atomic_output(path) as tmp:
        result = to_onnx(compiled, example_inputs, tmp, ops="custom", decode=decode, check=check, stage=stage)
        names = [tmp.name] + ([program.decode_path(tmp).name] if decode else [])
        for name in names:
            model = onnx.load(str(tmp.parent / name), load_external_data=False)  # external weights stay
            plugin_onnx(model)
            onnx.save(model, str(tmp.parent / name))
            for op, n in op_counts(model).items():
                counts[op] = counts.get(op, 0) + n
    files = tuple(f for name in names for f in program.written_files(path.parent / name))
    return ExportResult(path, "tensorrt-onnx", files, dict(sorted(counts.items())), result.check)
