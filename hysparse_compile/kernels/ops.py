"""The one registration point: every HySparse op as a `torch.library` custom op in the `hysparse` namespace, with a
fake (meta) implementation and autograd where it is meaningful, so `torch.compile`, `torch.export` and the
exporters see one node per op.

Ops (docs/design.md; the scalar parameters are the fields of `params.FullParams` / `params.SparseParams`):
    hysparse::full_attention            -> (out, indices, lse, scores)             autograd
    hysparse::full_attention_backward   -> (dq, dk, dv, dsinks)
    hysparse::sparse_attention          -> (out, lse, branch_out)                  autograd
    hysparse::sparse_attention_backward -> (dq, dk_own, dv_own, dk_shared, dv_shared, dgate_sparse, dgate_swa, dsinks)
    hysparse::full_attention_decode     -> (out, indices)                          one new token against a cache
    hysparse::sparse_attention_decode   -> out
    hysparse::full_attention_extend     -> (out, indices)                          R > 1 new tokens against a cache
    hysparse::sparse_attention_extend   -> out
The backend string travels with the call; "auto" is resolved when the op runs (`backends.resolve`). Parameters added
after an op's first version (`sinks` of the full ops, `softcap`) come last with a neutral default, and reach a
backend as keywords only when they are set, so a call without them is the call it always was.
Absent optional gradients come back from the backward ops as empty tensors and are turned into None here. Backward
ops pass `dout` with the strides autograd gives it (each backend copies only what its kernel needs), and the sparse
op's autograd does not save its output (`out` arrives empty in `sparse_attention_backward`). The decode and extend
ops serve inference against a KV cache and have no autograd.

`bind(op, args, kwargs)` names a call's arguments by the op's schema and gives its parameters as one value: the
exporters' replacement functions use it instead of retyping each schema.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor
from torch._C import DispatchKey

from . import backends
from .params import FullParams, SparseParams

_AUTOGRAD_KEYS = (DispatchKey.AutogradFunctionality, DispatchKey.ADInplaceOrView)


@contextlib.contextmanager
def _autograd_inside_op():
    """A custom op's implementation runs below the autograd dispatch key (grad recording is off even under
    `enable_grad`). Backward ops re-enable it around the backend call, so a backend may compute its backward by
    autograd on a recomputed forward (the reference and Flex backends do)."""
    saved = [torch._C._dispatch_tls_is_dispatch_key_excluded(key) for key in _AUTOGRAD_KEYS]
    for key in _AUTOGRAD_KEYS:
        torch._C._dispatch_tls_set_dispatch_key_excluded(key, False)
    try:
        with torch.enable_grad():
            yield
    finally:
        for key, was in zip(_AUTOGRAD_KEYS, saved):
            torch._C._dispatch_tls_set_dispatch_key_excluded(key, was)


def _impl(backend: str, op: str, q: Tensor, k: Tensor, **extra):
    meta = dict(device=q.device, dtype=q.dtype, head_dim=q.shape[-1], group=q.shape[1] // k.shape[1], **extra)
    return backends.resolve(backend, op, **meta)


def _set(**new) -> dict:
    """The newer parameters that are set (a backend is called with exactly the arguments it always had otherwise)."""
    return {k: v for k, v in new.items() if isinstance(v, Tensor) or (v is not None and bool(v))}


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


def _layout_of(x: Tensor, ref: Tensor) -> Tensor:
    """`x` in the layout `torch.empty_like(ref)` has, which is what the fake implementations declare (a compiled
    graph asserts it): a copy only when a backend returned another layout (e.g. the Triton sparse kernel writes a
    contiguous out for a transposed q; the output then needs the copy before `o_proj` anyway)."""
    if x.numel() == 0 or x.shape != ref.shape:
        return x
    want = torch.empty_like(ref, device="meta").stride()
    if x.stride() == want:
        return x
    return torch.empty_like(ref, dtype=x.dtype).copy_(x)


def sink_gradient(dout: Tensor, out: Tensor, lse: Tensor, sinks: Tensor) -> Tensor:
    """dL/dsinks of a softmax with a sink logit per head (any backend: it needs only the op's outputs).
    With p_sink = exp(sink - logaddexp(lse, sink)) the sink's share of each row's denominator:
    dL/dsink_h = -sum_{b, t} p_sink[b, h, t] * (dout . out)[b, h, t]. dout/out [B, Hq, T, d], lse [B, Hq, T] (keys
    alone), sinks [Hq] -> [Hq] in sinks' dtype."""
    ct = torch.float64 if out.dtype == torch.float64 else torch.float32
    delta = (dout.to(ct) * out.to(ct)).sum(-1)  # [B, Hq, T]
    s = sinks.to(ct).view(1, -1, 1)
    share = torch.exp(s - torch.logaddexp(lse.to(ct), s))
    return -(share * delta).sum((0, 2)).to(sinks.dtype)


# ---------------------------------------------------------------------------------------------- full attention
@torch.library.custom_op("hysparse::full_attention", mutates_args=())
def full_attention(q: Tensor, k: Tensor, v: Tensor, block_size: int, topk: int, scale: float, return_scores: bool,
                   backend: str, sinks: Optional[Tensor] = None,
                   softcap: float = 0.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    impl = _impl(backend, "full_attention", q, k, block_size=block_size, nsel=topk // block_size, softcap=softcap,
                 sinks=sinks is not None)
    out, indices, lse, scores = impl.full_attention_fwd(q, k, v, block_size, topk, scale, return_scores,
                                                        **_set(sinks=sinks, softcap=softcap))
    return _layout_of(out, q), indices, lse, scores if return_scores else q.new_empty(0, dtype=torch.float32)


@full_attention.register_fake
def _(q, k, v, block_size, topk, scale, return_scores, backend, sinks=None, softcap=0.0):
    B, Hq, T, d = q.shape
    nb = -(-T // block_size)
    out = torch.empty_like(q)
    indices = q.new_empty((B, k.shape[1], T, topk // block_size), dtype=torch.int32)
    lse = q.new_empty((B, Hq, T), dtype=torch.float32)
    scores = q.new_empty((B, Hq, T, nb) if return_scores else (0,), dtype=torch.float32)
    return out, indices, lse, scores


@torch.library.custom_op("hysparse::full_attention_backward", mutates_args=())
def full_attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float,
                            backend: str, sinks: Optional[Tensor] = None,
                            softcap: float = 0.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    impl = _impl(backend, "full_attention", q, k, softcap=softcap, sinks=sinks is not None)
    with _autograd_inside_op():
        dq, dk, dv = impl.full_attention_bwd(dout, q, k, v, out, lse, scale,  # any strides: no copy of dout
                                             **_set(sinks=sinks, softcap=softcap))
    dsinks = _empty(q) if sinks is None else sink_gradient(dout, out, lse, sinks)
    return _layout_of(dq.detach(), q), _layout_of(dk.detach(), k), _layout_of(dv.detach(), v), dsinks


@full_attention_backward.register_fake
def _(dout, q, k, v, out, lse, scale, backend, sinks=None, softcap=0.0):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            _empty(q) if sinks is None else torch.empty_like(sinks))


def _full_setup(ctx, inputs, output):
    q, k, v, block_size, topk, scale, return_scores, backend, sinks, softcap = inputs
    out, indices, lse, scores = output
    ctx.save_for_backward(q, k, v, out, lse, sinks)
    ctx.args = (scale, backend, softcap)
    ctx.mark_non_differentiable(indices, lse, scores)


def _full_backward(ctx, dout, dindices, dlse, dscores):
    q, k, v, out, lse, sinks = ctx.saved_tensors
    if dout is None:
        return (None,) * 10
    scale, backend, softcap = ctx.args
    dq, dk, dv, dsinks = torch.ops.hysparse.full_attention_backward(dout, q, k, v, out, lse, scale, backend, sinks,
                                                                    softcap)
    return dq, dk, dv, None, None, None, None, None, None if sinks is None else dsinks, None


full_attention.register_autograd(_full_backward, setup_context=_full_setup)


# ---------------------------------------------------------------------------------------------- sparse attention
@torch.library.custom_op("hysparse::sparse_attention", mutates_args=())
def sparse_attention(q: Tensor, k_own: Tensor, v_own: Tensor, k_shared: Tensor, v_shared: Tensor, indices: Tensor,
                     gate_sparse: Optional[Tensor], gate_swa: Optional[Tensor], sinks: Optional[Tensor],
                     block_size: int, window: int, scale: float, merge: bool, save_branches: bool,
                     backend: str, softcap: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    impl = _impl(backend, "sparse_attention", q, k_own, block_size=block_size, nsel=indices.shape[-1],
                 softcap=softcap)
    out, lse, branch_out = impl.sparse_attention_fwd(q, k_own, v_own, k_shared, v_shared, indices, gate_sparse,
                                                     gate_swa, sinks, block_size, window, scale, merge, save_branches,
                                                     **_set(softcap=softcap))
    if not save_branches:
        branch_out = q.new_empty(0)
    elif branch_out is None or branch_out.numel() == 0:  # backend recomputes in its backward: keep the shape only
        branch_out = q.new_empty((2, *q.shape))
    return _layout_of(out, q), lse, branch_out


@sparse_attention.register_fake
def _(q, k_own, v_own, k_shared, v_shared, indices, gate_sparse, gate_swa, sinks, block_size, window, scale, merge,
      save_branches, backend, softcap=0.0):
    B, Hq, T, d = q.shape
    lse = q.new_empty((B, Hq, T, 2), dtype=torch.float32)
    branch = q.new_empty((2, B, Hq, T, d) if save_branches else (0,))
    return torch.empty_like(q), lse, branch


@torch.library.custom_op("hysparse::sparse_attention_backward", mutates_args=())
def sparse_attention_backward(dout: Tensor, q: Tensor, k_own: Tensor, v_own: Tensor, k_shared: Tensor,
                              v_shared: Tensor, indices: Tensor, gate_sparse: Optional[Tensor],
                              gate_swa: Optional[Tensor], sinks: Optional[Tensor], out: Tensor, lse: Tensor,
                              branch_out: Tensor, block_size: int, window: int, scale: float, merge: bool,
                              backend: str, softcap: float = 0.0
                              ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    impl = _impl(backend, "sparse_attention", q, k_own, block_size=block_size, nsel=indices.shape[-1],
                 softcap=softcap)
    with _autograd_inside_op():
        grads = impl.sparse_attention_bwd(dout, q, k_own, v_own, k_shared, v_shared, indices,
                                          gate_sparse, gate_swa, sinks, out, lse, branch_out, block_size, window,
                                          scale, merge, **_set(softcap=softcap))
    like = (q, k_own, v_own, k_shared, v_shared, gate_sparse, gate_swa, sinks)
    return tuple(_empty(q) if g is None else _layout_of(g.detach(), ref) for g, ref in zip(grads, like))


@sparse_attention_backward.register_fake
def _(dout, q, k_own, v_own, k_shared, v_shared, indices, gate_sparse, gate_swa, sinks, out, lse, branch_out,
      block_size, window, scale, merge, backend, softcap=0.0):
    like = lambda t: _empty(q) if t is None else torch.empty_like(t)  # noqa: E731
    return (torch.empty_like(q), torch.empty_like(k_own), torch.empty_like(v_own), torch.empty_like(k_shared),
            torch.empty_like(v_shared), like(gate_sparse), like(gate_swa), like(sinks))


def _sparse_setup(ctx, inputs, output):
    (q, k_own, v_own, k_shared, v_shared, indices, gate_sparse, gate_swa, sinks, block_size, window, scale, merge,
     save_branches, backend, softcap) = inputs
    out, lse, branch_out = output
    # `out` is not kept: no backend's backward reads it (the gate gradients need each branch's own output, which
    # branch_out holds or the backward recomputes), so the layer's activations do not hold it a second time
    ctx.save_for_backward(q, k_own, v_own, k_shared, v_shared, indices, gate_sparse, gate_swa, sinks, _empty(q), lse,
                          branch_out)
    ctx.args = (block_size, window, scale, merge, backend, softcap)
    ctx.mark_non_differentiable(lse, branch_out)


def _sparse_backward(ctx, dout, dlse, dbranch):
    saved = ctx.saved_tensors
    if dout is None:
        return (None,) * 16
    grads = torch.ops.hysparse.sparse_attention_backward(dout, *saved, *ctx.args)
    present = (True, True, True, True, True, saved[6] is not None, saved[7] is not None, saved[8] is not None)
    grads = [g if keep else None for g, keep in zip(grads, present)]
    return (*grads[:5], None, *grads[5:], None, None, None, None, None, None, None)


sparse_attention.register_autograd(_sparse_backward, setup_context=_sparse_setup)


# ---------------------------------------------------------------------------------------------- decode
@torch.library.custom_op("hysparse::full_attention_decode", mutates_args=())
def full_attention_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_len: Tensor, block_size: int,
                          topk: int, scale: float, backend: str, sinks: Optional[Tensor] = None,
                          softcap: float = 0.0) -> tuple[Tensor, Tensor]:
    impl = _impl(backend, "full_attention_decode", q, k_cache, block_size=block_size, nsel=topk // block_size,
                 softcap=softcap, sinks=sinks is not None)
    out, indices = impl.full_attention_decode(q, k_cache, v_cache, cache_len, block_size, topk, scale,
                                              **_set(sinks=sinks, softcap=softcap))
    return _layout_of(out, q), indices


@full_attention_decode.register_fake
def _(q, k_cache, v_cache, cache_len, block_size, topk, scale, backend, sinks=None, softcap=0.0):
    B = q.shape[0]
    return torch.empty_like(q), q.new_empty((B, k_cache.shape[1], 1, topk // block_size), dtype=torch.int32)


@torch.library.custom_op("hysparse::sparse_attention_decode", mutates_args=())
def sparse_attention_decode(q: Tensor, k_win: Tensor, v_win: Tensor, k_shared: Tensor, v_shared: Tensor,
                            indices: Tensor, cache_len: Tensor, gate_sparse: Optional[Tensor],
                            gate_swa: Optional[Tensor], sinks: Optional[Tensor], block_size: int, window: int,
                            scale: float, merge: bool, backend: str, softcap: float = 0.0) -> Tensor:
    impl = _impl(backend, "sparse_attention_decode", q, k_shared, block_size=block_size, nsel=indices.shape[-1],
                 softcap=softcap)
    return _layout_of(impl.sparse_attention_decode(q, k_win, v_win, k_shared, v_shared, indices, cache_len,
                                                   gate_sparse, gate_swa, sinks, block_size, window, scale, merge,
                                                   **_set(softcap=softcap)), q)


@sparse_attention_decode.register_fake
def _(q, k_win, v_win, k_shared, v_shared, indices, cache_len, gate_sparse, gate_swa, sinks, block_size, window,
      scale, merge, backend, softcap=0.0):
    return torch.empty_like(q)


# ---------------------------------------------------------------------------------------------- extend
@torch.library.custom_op("hysparse::full_attention_extend", mutates_args=())
def full_attention_extend(q: Tensor, k_cache: Tensor, v_cache: Tensor, start: Tensor, block_size: int, topk: int,
                          scale: float, backend: str, sinks: Optional[Tensor] = None,
                          softcap: float = 0.0) -> tuple[Tensor, Tensor]:
    impl = _impl(backend, "full_attention_extend", q, k_cache, block_size=block_size, nsel=topk // block_size,
                 softcap=softcap, sinks=sinks is not None)
    out, indices = impl.full_attention_extend(q, k_cache, v_cache, start, block_size, topk, scale,
                                              **_set(sinks=sinks, softcap=softcap))
    return _layout_of(out, q), indices


@full_attention_extend.register_fake
def _(q, k_cache, v_cache, start, block_size, topk, scale, backend, sinks=None, softcap=0.0):
    B, _, R, _ = q.shape
    return torch.empty_like(q), q.new_empty((B, k_cache.shape[1], R, topk // block_size), dtype=torch.int32)


@torch.library.custom_op("hysparse::sparse_attention_extend", mutates_args=())
def sparse_attention_extend(q: Tensor, k_shared: Tensor, v_shared: Tensor, indices: Tensor, k_win: Tensor,
                            v_win: Tensor, win_pos: Tensor, start: Tensor, gate_sparse: Optional[Tensor],
                            gate_swa: Optional[Tensor], sinks: Optional[Tensor], block_size: int, window: int,
                            scale: float, merge: bool, backend: str, softcap: float = 0.0) -> Tensor:
    impl = _impl(backend, "sparse_attention_extend", q, k_shared, block_size=block_size, nsel=indices.shape[-1],
                 softcap=softcap)
    return _layout_of(impl.sparse_attention_extend(q, k_shared, v_shared, indices, k_win, v_win, win_pos, start,
                                                   gate_sparse, gate_swa, sinks, block_size, window, scale, merge,
                                                   **_set(softcap=softcap)), q)


@sparse_attention_extend.register_fake
def _(q, k_shared, v_shared, indices, k_win, v_win, win_pos, start, gate_sparse, gate_swa, sinks, block_size, window,
      scale, merge, backend, softcap=0.0):
    return torch.empty_like(q)


# ---------------------------------------------------------------------------------------------- binding
FULL_OPS = ("full_attention", "full_attention_decode", "full_attention_extend")
SPARSE_OPS = ("sparse_attention", "sparse_attention_decode", "sparse_attention_extend")


class OpCall:
    """A call of one `hysparse::<op>`, its arguments by name (`call.q`, `call.sinks`, ...; defaults filled in) and its
    scalar parameters as one value (`call.params`: `FullParams` or `SparseParams`)."""

    def __init__(self, op: str, arguments: dict):
        self.op, self.arguments = op, arguments
        a = arguments
        if op in FULL_OPS:
            self.params = FullParams(a["block_size"], a["topk"], a["scale"], a["softcap"])
        else:
            self.params = SparseParams(a["block_size"], a["window"], a["scale"], bool(a["merge"]), a["softcap"])

    def __getattr__(self, name):
        try:
            return self.__dict__["arguments"][name]
        except KeyError:
            raise AttributeError(name) from None


def bind(op: str, args: tuple, kwargs: dict | None = None) -> OpCall:
    """Name the arguments of a `torch.ops.hysparse.<op>` call (positional or keyword, as a capture-time replacement
    receives them) by the op's registered schema.

    >>> call = bind("full_attention", (q, k, v, 16, 64, 0.125, False, "auto"))   # doctest: +SKIP
    >>> call.params, call.sinks                                                   # doctest: +SKIP
    (FullParams(block_size=16, topk=64, scale=0.125, softcap=0.0), None)
    """
    schema = getattr(torch.ops.hysparse, op).default._schema
    kwargs = kwargs or {}
    named = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(args):
            named[arg.name] = args[i]
        elif arg.name in kwargs:
            named[arg.name] = kwargs[arg.name]
        elif arg.has_default_value():
            named[arg.name] = arg.default_value
        elif arg.name == "backend":  # a replacement runs no backend: callers may leave it out
            named[arg.name] = "auto"
        else:
            raise TypeError(f"hysparse::{op}: missing argument {arg.name!r}")
    return OpCall(op, named)
