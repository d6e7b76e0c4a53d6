"""The HySparse ops as functions: validate the inputs, then call the `hysparse::*` custom ops.

Layout as SDPA: `q [B, Hq, T, d]`, `k, v [B, Hkv, T, d]`, `Hq % Hkv == 0`. Semantics in docs/design.md.

    >>> import torch
    >>> from hysparse_compile import functional as F
    >>> q, k, v = torch.randn(1, 8, 100, 64), torch.randn(1, 2, 100, 64), torch.randn(1, 2, 100, 64)
    >>> out, idx = F.full_attention(q, k, v, block_size=16, topk=32)
    >>> idx.shape, idx.dtype
    (torch.Size([1, 2, 100, 2]), torch.int32)
    >>> y = F.sparse_attention(q, k, v, k, v, idx, block_size=16, window=8, sinks=torch.zeros(8))

Every op also takes `softcap` (logits -> softcap * tanh(logits / softcap) before the softmax, Gemma 2); the full-layer
ops take per-head `sinks` as the sparse ones do (gpt-oss). Inside, the scalar parameters travel as one value
(`kernels.params.FullParams` / `SparseParams`).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .kernels import backends
from .kernels import ops  # noqa: F401  (registers torch.ops.hysparse.*)
from .kernels.params import FullParams, SparseParams, check_block_size, check_window

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ---------------------------------------------------------------------------------------------- validation
def _tensor(name: str, x, *, ndim: int = 4) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(x.shape)}")
    return x


def _same(name: str, x: Tensor, ref_name: str, ref: Tensor) -> None:
    if x.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but {ref_name} has {ref.dtype}; they must match")
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}; they must be on one device")


def _qkv(q: Tensor, pairs: list[tuple[str, Tensor]], *, cache: bool = False) -> tuple[int, int, int, int, int]:
    """Check q and its (name, K/V tensor) pairs; returns B, Hq, Hkv, Tk, d (Tk = the keys' length).

    Prefill (`cache=False`): keys have q's length T. Decode (`cache=True`): keys are a cache of any length S.
    """
    _tensor("q", q)
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"q must be float16, bfloat16, float32 or float64, got {q.dtype}")
    B, Hq, T, d = q.shape
    if any(n == 0 for n in (B, Hq, T, d)):  # not min(): under torch.export it compares sizes and specializes them
        raise ValueError(f"q has shape {tuple(q.shape)}: B, Hq, T and d must all be >= 1 (an empty batch or sequence "
                         f"has nothing to attend to; skip the call)")
    name0, k0 = pairs[0]
    length = "S" if cache else f"T={T}"
    for name, x in pairs:
        _tensor(name, x)
        _same(name, x, "q", q)
        if x.shape[0] != B or x.shape[3] != d or (not cache and x.shape[2] != T):
            raise ValueError(f"{name} has shape {tuple(x.shape)}; expected [B={B}, Hkv, {length}, d={d}] to match q "
                             f"{tuple(q.shape)}")
        if x.shape != k0.shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)} but {name0} has {tuple(k0.shape)}; they must match")
    Hkv = k0.shape[1]
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"q has {Hq} heads and {name0} has {Hkv}: the query heads must be a multiple of the KV "
                         f"heads (GQA), e.g. Hkv in {[h for h in range(1, Hq + 1) if Hq % h == 0]}")
    return B, Hq, Hkv, k0.shape[2], d


def _indices(indices, B: int, Hkv: int, T: int, q: Tensor, name: str = "indices") -> int:
    _tensor(name, indices)
    if indices.dtype != torch.int32:
        raise TypeError(f"{name} must be int32 (as full_attention returns it), got {indices.dtype}")
    if indices.device != q.device:
        raise ValueError(f"{name} is on {indices.device} but q is on {q.device}")
    if tuple(indices.shape[:3]) != (B, Hkv, T) or indices.shape[3] < 1:
        raise ValueError(f"{name} has shape {tuple(indices.shape)}; expected [B={B}, Hkv={Hkv}, T={T}, nsel>=1]")
    return indices.shape[3]


def tracing() -> bool:
    """Whether torch.compile, torch.export or jit tracing is running: values are symbolic, and only torch ops are
    recorded (a direct kernel launch would run once at trace time and be missing from the trace)."""
    if torch.compiler.is_compiling():  # first, alone: nothing below is asked while Dynamo traces (no graph break)
        return True
    return torch.compiler.is_exporting() or torch.jit.is_tracing()


def _content_checks(x: Tensor) -> bool:
    """Whether to look at a tensor's values: eagerly, on CPU (no host sync: on CUDA it would stall every call, so
    there the contents are not checked; `check_indices` does it on request), never while `tracing()` (the values
    are symbolic there) or on fake/meta tensors."""
    if tracing():
        return False
    from torch._subclasses.fake_tensor import is_fake

    return x.device.type == "cpu" and not is_fake(x)


def check_indices(indices: Tensor, positions: Tensor, num_blocks: int, block_size: int,
                  name: str = "indices") -> None:
    """Raise ValueError unless `indices` follows the selection contract (docs/design.md): in each row, distinct
    block indices in [0, num_blocks) with `j * block_size <= position`, ascending, then -1 padding.

    indices int [B, Hkv, R, nsel]; positions int [R] or [B, R] (the row's token position: t in prefill,
    cache_len - 1 in decode). The sparse ops check this themselves on CPU; call it to check CUDA tensors (one host
    synchronization).

    >>> idx = torch.tensor([[[[0, 2], [1, -1]]]], dtype=torch.int32)
    >>> check_indices(idx, torch.tensor([40, 12]), num_blocks=3, block_size=16)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: indices[0, 0, 1, 0] = 1 is a block in the future of its token at position 12: ... j <= 0 ...
    """
    B, Hkv, R, nsel = indices.shape
    i = indices.long()
    pos = positions.to(i.device).long().view(-1 if positions.dim() == 2 else 1, 1, R, 1).expand(B, 1, R, 1)
    real = i >= 0
    out_of_range = (i < -1) | (i >= num_blocks)
    future = real & ~out_of_range & (i * block_size > pos)
    a, b = i[..., :-1], i[..., 1:]
    repeated = (a >= 0) & (b == a)
    unsorted = (a >= 0) & (b >= 0) & (b < a)
    pad_first = (a == -1) & (b >= 0)
    if not bool((out_of_range | future).any() | (repeated | unsorted | pad_first).any()):
        return

    def first(mask):
        return tuple(int(c) for c in mask.nonzero()[0])

    if bool(out_of_range.any()):
        at = first(out_of_range)
        raise ValueError(f"{name}[{', '.join(map(str, at))}] = {int(i[at])} is out of range: valid entries are -1 "
                         f"(padding) and block indices 0..{num_blocks - 1} (block_size={block_size})")
    if bool(future.any()):
        at = first(future)
        t = int(pos[at[0], 0, at[2], 0])
        raise ValueError(f"{name}[{', '.join(map(str, at))}] = {int(i[at])} is a block in the future of its token at "
                         f"position {t}: a token selects blocks j with j * block_size <= {t}, i.e. "
                         f"j <= {t // block_size} (block_size={block_size})")
    for mask, what in ((repeated, "repeats a block: a row's blocks must be distinct"),
                       (unsorted, "is not sorted: a row's blocks must ascend (as full_attention returns them)"),
                       (pad_first, "has -1 padding before a block: the padding must come last")):
        if bool(mask.any()):
            row = first(mask)[:3]
            raise ValueError(f"{name}[{', '.join(map(str, row))}] = {i[row].tolist()} {what}")


def _gate(name: str, gate, B: int, Hq: int, T: int, d: int, q: Tensor):
    """Broadcast a gate to exactly [B, Hq, T, 1] (per head) or [B, Hq, T, d] (per channel)."""
    if gate is None:
        return None
    if not isinstance(gate, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(gate).__name__}")
    _same(name, gate, "q", q)
    last = gate.shape[-1] if gate.dim() else 1
    target = (B, Hq, T, 1 if last == 1 else d)
    try:
        if gate.dim() > 4:
            raise RuntimeError("too many dims")
        return gate.expand(target)
    except RuntimeError:
        raise ValueError(f"{name} has shape {tuple(gate.shape)}; it must broadcast to [B, Hq, T, 1] (one gate per head) "
                     f"or [B, Hq, T, d] (one per channel) = {(B, Hq, T, 1)} or {(B, Hq, T, d)}") from None


def _sinks(sinks, Hq: int, q: Tensor):
    if sinks is None:
        return None
    _tensor("sinks", sinks, ndim=1)
    if sinks.shape[0] != Hq or not sinks.is_floating_point():
        raise ValueError(f"sinks must be a float tensor of shape [Hq={Hq}] (one logit per query head), "
                         f"got {sinks.dtype} {tuple(sinks.shape)}")
    if sinks.device != q.device:
        raise ValueError(f"sinks is on {sinks.device} but q is on {q.device}")
    return sinks


def _backend(backend: str, op: str, q: Tensor, Hkv: int, **extra) -> str:
    if backend not in backends.CHOICES:
        raise ValueError(f"backend must be one of {', '.join(map(repr, backends.CHOICES))}, got {backend!r}")
    if backend != "auto" and not torch.compiler.is_compiling():
        backends.resolve(backend, op, device=q.device, dtype=q.dtype, head_dim=q.shape[-1], group=q.shape[1] // Hkv,
                         **extra)  # raises with the reason and the backends that can
    return backend


def _autocast(*tensors):
    """Inside `torch.autocast` the ops run in the autocast dtype, as SDPA does (a lower-precision op there): their
    floating inputs are cast to it (a model's RoPE upcast otherwise leaves q and k in float32 and v in bfloat16).
    Outside autocast the tensors are returned as they are."""
    device = next(t for t in tensors if isinstance(t, Tensor)).device.type
    # Dynamo folds `is_autocast_enabled` but torch 2.11's cannot trace `is_autocast_available` (a C builtin): asked
    # while compiling, it broke the graph at every HySparse op (the "Dynamo does not know how to trace the builtin
    # torch._C._is_autocast_available" warning of the GPU runs). Under torch.compile the tensors are on a real
    # device, so only a meta tensor (no autocast state) needs the question.
    available = device != "meta" if torch.compiler.is_compiling() else torch.amp.is_autocast_available(device)
    if not (available and torch.is_autocast_enabled(device)):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != dtype else t
                 for t in tensors)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# ---------------------------------------------------------------------------------------------- ops
def _full_params(block_size, topk, scale, softcap, d: int) -> FullParams:
    return FullParams.checked(block_size=block_size, topk=topk, scale=scale, softcap=softcap, head_dim=d)


def _sparse_params(block_size, window, scale, merge, softcap, d: int) -> SparseParams:
    return SparseParams.checked(block_size=block_size, window=window, scale=scale, merge=merge, softcap=softcap,
                                head_dim=d)


def full_attention(q: Tensor, k: Tensor, v: Tensor, *, block_size: int = 64, topk: int = 1024, scale=None,
                   backend: str = "auto", return_scores: bool = False, sinks=None, softcap=None):
    """Causal attention plus block selection (docs/design.md, `full_attention`).

    q [B, Hq, T, d], k/v [B, Hkv, T, d] -> out [B, Hq, T, d], indices int32 [B, Hkv, T, topk // block_size]
    (the top blocks of the group-max block scores among blocks starting at or before each token, sorted ascending,
    -1 padded). With `return_scores=True` also the per-head block scores float32 [B, Hq, T, ceil(T / block_size)].
    sinks [Hq]: a sink logit per head in the softmax denominator (gpt-oss); softcap: logits -> softcap *
    tanh(logits / softcap) (Gemma 2).
    """
    q, k, v = _autocast(q, k, v)
    B, Hq, Hkv, T, d = _qkv(q, [("k", k), ("v", v)])
    p = _full_params(block_size, topk, scale, softcap, d)
    sinks = _sinks(sinks, Hq, q)
    backend = _backend(backend, "full_attention", q, Hkv, block_size=p.block_size, nsel=p.nsel, softcap=p.softcap,
                       sinks=sinks is not None)
    out, indices, _, scores = torch.ops.hysparse.full_attention(q, k, v, *p.op_args(), bool(return_scores), backend,
                                                                sinks, p.softcap)
    return (out, indices, scores) if return_scores else (out, indices)


def sparse_attention(q: Tensor, k_own: Tensor, v_own: Tensor, k_shared: Tensor, v_shared: Tensor, indices: Tensor,
                     *, block_size: int = 64, window: int | None = 128, gate_sparse=None, gate_swa=None, sinks=None,
                     scale=None, merge: bool = False, save_branches: bool = False, backend: str = "auto",
                     softcap=None) -> Tensor:
    """The sparse layer (docs/design.md, `sparse_attention`): sparse branch over `k_shared/v_shared` at the selected
    blocks, SWA branch over `k_own/v_own` in the last `window` positions (`window=None`: no SWA branch), sinks in
    each denominator, gates on the branch outputs. `merge=True` (training-free): one softmax over selected blocks ∪
    window of `k_shared/v_shared` (pass the layer's own K/V there; `k_own/v_own` are not read), no gates.
    save_branches: under autograd, keep both ungated branch outputs for the backward (two more [B, Hq, T, d]
    activations; the Triton backward then skips recomputing the forward). Default False: like SDPA, only the
    log-sum-exp is kept and the backward recomputes the branches (docs/kernels_sparse.md, "Activation memory").
    softcap: logits of both branches -> softcap * tanh(logits / softcap).

    q [B, Hq, T, d]; k_*/v_* [B, Hkv, T, d]; indices int32 [B, Hkv, T, nsel]; gates broadcastable to
    [B, Hq, T, 1] or [B, Hq, T, d]; sinks [Hq] -> out [B, Hq, T, d]
    """
    q, k_own, v_own, k_shared, v_shared, gate_sparse, gate_swa = _autocast(q, k_own, v_own, k_shared, v_shared,
                                                                            gate_sparse, gate_swa)  # sinks: any dtype
    B, Hq, Hkv, T, d = _qkv(q, [("k_own", k_own), ("v_own", v_own), ("k_shared", k_shared), ("v_shared", v_shared)])
    check_block_size(block_size)
    check_window(window)
    _check_gates(merge, window, gate_sparse, gate_swa)
    nsel = _indices(indices, B, Hkv, T, q)
    if _content_checks(indices):
        check_indices(indices, torch.arange(T), -(-T // block_size), block_size)
    gate_sparse = _gate("gate_sparse", gate_sparse, B, Hq, T, d, q)
    gate_swa = _gate("gate_swa", gate_swa, B, Hq, T, d, q)
    sinks = _sinks(sinks, Hq, q)
    p = _sparse_params(block_size, window, scale, merge, softcap, d)
    backend = _backend(backend, "sparse_attention", q, Hkv, block_size=block_size, nsel=nsel, softcap=p.softcap)
    if not isinstance(save_branches, bool):
        raise TypeError(f"save_branches must be True or False, got {save_branches!r}")
    save = save_branches and _needs_grad(q, k_own, v_own, k_shared, v_shared, gate_sparse, gate_swa, sinks)
    out, _, _ = torch.ops.hysparse.sparse_attention(q, k_own, v_own, k_shared, v_shared, indices, gate_sparse,
                                                    gate_swa, sinks, *p.op_args(), save, backend, p.softcap)
    return out


def _check_gates(merge, window, gate_sparse, gate_swa, what: str = "it is a single softmax") -> None:
    if merge and (gate_sparse is not None or gate_swa is not None):
        raise ValueError(f"merge=True (training-free) takes no gates: {what}; pass gate_sparse=None and "
                         f"gate_swa=None")
    if not merge and window is None and gate_swa is not None:
        raise ValueError("gate_swa was given but window=None turns the SWA branch off; drop gate_swa or set a window")


def _cache_len(cache_len, B: int, S: int, q: Tensor, name: str = "cache_len", lo: int = 1) -> Tensor:
    _tensor(name, cache_len, ndim=1)
    if cache_len.shape[0] != B or cache_len.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be an int32/int64 tensor of shape [B={B}], got {cache_len.dtype} "
                         f"{tuple(cache_len.shape)}")
    if cache_len.device != q.device:
        raise ValueError(f"{name} is on {cache_len.device} but q is on {q.device}")
    if _content_checks(cache_len):
        low, high = int(cache_len.min()), int(cache_len.max())
        if low < lo or high > S:
            what = "the cache length, new token included" if name == "cache_len" else "the cache length"
            raise ValueError(f"{name} values must be in {lo}..{S} ({what}), got min {low}, max {high}")
    return cache_len.to(torch.int32) if name == "cache_len" else cache_len


def _decode_q(q: Tensor) -> None:
    _tensor("q", q)
    if q.shape[2] != 1:
        raise ValueError(f"decode takes one new token per sequence: q must be [B, Hq, 1, d], got {tuple(q.shape)}")


def full_attention_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_len: Tensor, *, block_size: int = 64,
                          topk: int = 1024, scale=None, backend: str = "auto", sinks=None, softcap=None):
    """One decode step of a full layer; the caches already hold the new token at position `cache_len - 1`.

    q [B, Hq, 1, d]; k_cache/v_cache [B, Hkv, S, d]; cache_len int [B]
    -> out [B, Hq, 1, d], indices int32 [B, Hkv, 1, topk // block_size]
    """
    _decode_q(q)
    B, Hq, Hkv, S, d = _qkv(q, [("k_cache", k_cache), ("v_cache", v_cache)], cache=True)
    p = _full_params(block_size, topk, scale, softcap, d)
    cache_len = _cache_len(cache_len, B, S, q)
    sinks = _sinks(sinks, Hq, q)
    backend = _backend(backend, "full_attention_decode", q, Hkv, block_size=p.block_size, nsel=p.nsel,
                       softcap=p.softcap, sinks=sinks is not None)
    return torch.ops.hysparse.full_attention_decode(q, k_cache, v_cache, cache_len, *p.op_args(), backend, sinks,
                                                    p.softcap)


def _window_tensors(k_win, v_win, B: int, Hkv: int, d: int, q: Tensor) -> None:
    for name, x in (("k_win", k_win), ("v_win", v_win)):
        _tensor(name, x)
        _same(name, x, "q", q)
        if (x.shape[0], x.shape[1], x.shape[3]) != (B, Hkv, d):
            raise ValueError(f"{name} has shape {tuple(x.shape)}; expected [B={B}, Hkv={Hkv}, W, d={d}]")


def sparse_attention_decode(q: Tensor, k_win: Tensor, v_win: Tensor, k_shared: Tensor, v_shared: Tensor,
                            indices: Tensor, cache_len: Tensor, *, block_size: int = 64, window: int | None = 128,
                            gate_sparse=None, gate_swa=None, sinks=None, scale=None, merge: bool = False,
                            backend: str = "auto", softcap=None) -> Tensor:
    """One decode step of a sparse layer at position `cache_len - 1`.

    q [B, Hq, 1, d]; k_win/v_win [B, Hkv, W, d] the SWA ring buffer (position p in slot p % W, W >= window);
    k_shared/v_shared [B, Hkv, S, d] the full layer's cache (with merge=True: this layer's own full cache, which
    also serves the window; k_win/v_win are not read); indices int32 [B, Hkv, 1, nsel]; cache_len int [B]
    -> out [B, Hq, 1, d]
    """
    _decode_q(q)
    B, Hq, Hkv, S, d = _qkv(q, [("k_shared", k_shared), ("v_shared", v_shared)], cache=True)
    _window_tensors(k_win, v_win, B, Hkv, d, q)
    check_block_size(block_size)
    if window is not None:
        check_window(window)
        if not merge and k_win.shape[2] < window:
            raise ValueError(f"k_win holds {k_win.shape[2]} slots but window={window}: the ring buffer needs at "
                             f"least window slots")
    _check_gates(merge, None if merge else 0, gate_sparse, gate_swa, "it is a single softmax")
    nsel = _indices(indices, B, Hkv, 1, q)
    cache_len = _cache_len(cache_len, B, S, q)
    if _content_checks(indices) and _content_checks(cache_len):
        check_indices(indices, cache_len.view(B, 1) - 1, -(-S // block_size), block_size)
    gate_sparse = _gate("gate_sparse", gate_sparse, B, Hq, 1, d, q)
    gate_swa = _gate("gate_swa", gate_swa, B, Hq, 1, d, q)
    sinks = _sinks(sinks, Hq, q)
    p = _sparse_params(block_size, window, scale, merge, softcap, d)
    backend = _backend(backend, "sparse_attention_decode", q, Hkv, block_size=block_size, nsel=nsel,
                       softcap=p.softcap)
    return torch.ops.hysparse.sparse_attention_decode(q, k_win, v_win, k_shared, v_shared, indices, cache_len,
                                                      gate_sparse, gate_swa, sinks, *p.op_args(), backend, p.softcap)


def full_attention_extend(q: Tensor, k_cache: Tensor, v_cache: Tensor, start: Tensor, *, block_size: int = 64,
                          topk: int = 1024, scale=None, backend: str = "auto", sinks=None, softcap=None):
    """R new tokens per row against a filled cache (chunked prefill, speculative verification): the rows of a
    prefill at positions `start[b] .. start[b] + R - 1`, whose K/V the caches already hold.

    q [B, Hq, R, d]; k_cache/v_cache [B, Hkv, S, d]; start int [B] (tokens cached before the call)
    -> out [B, Hq, R, d], indices int32 [B, Hkv, R, topk // block_size]
    """
    B, Hq, Hkv, S, d = _qkv(q, [("k_cache", k_cache), ("v_cache", v_cache)], cache=True)
    p = _full_params(block_size, topk, scale, softcap, d)
    start = _cache_len(start, B, S - q.shape[2], q, name="start", lo=0)
    sinks = _sinks(sinks, Hq, q)
    backend = _backend(backend, "full_attention_extend", q, Hkv, block_size=p.block_size, nsel=p.nsel,
                       softcap=p.softcap, sinks=sinks is not None)
    return torch.ops.hysparse.full_attention_extend(q, k_cache, v_cache, start, *p.op_args(), backend, sinks,
                                                    p.softcap)


def sparse_attention_extend(q: Tensor, k_shared: Tensor, v_shared: Tensor, indices: Tensor, k_win: Tensor,
                            v_win: Tensor, win_pos: Tensor, start: Tensor, *, block_size: int = 64,
                            window: int | None = 128, gate_sparse=None, gate_swa=None, sinks=None, scale=None,
                            merge: bool = False, backend: str = "auto", softcap=None) -> Tensor:
    """The sparse layer for R new tokens per row at positions `start[b] + r` (docs/runtime.md, "Decode and extend").

    q [B, Hq, R, d]; k_shared/v_shared [B, Hkv, S, d] the cache the sparse branch reads (linear: position = slot;
    the new tokens written); k_win/v_win [B, Hkv, K, d] with win_pos int [B, K] (-1 = empty): the keys the SWA
    branch may read (ring slots followed by the new tokens, or a linear cache; not read with merge); indices int32
    [B, Hkv, R, nsel]; start int [B] -> out [B, Hq, R, d]
    """
    B, Hq, Hkv, S, d = _qkv(q, [("k_shared", k_shared), ("v_shared", v_shared)], cache=True)
    R = q.shape[2]
    _window_tensors(k_win, v_win, B, Hkv, d, q)
    _tensor("win_pos", win_pos, ndim=2)
    if tuple(win_pos.shape) != (B, k_win.shape[2]) or win_pos.is_floating_point():
        raise ValueError(f"win_pos must be an int tensor [B={B}, K={k_win.shape[2]}] (the position of each of "
                         f"k_win's keys, -1 = empty), got {win_pos.dtype} {tuple(win_pos.shape)}")
    check_block_size(block_size)
    _check_gates(merge, window, gate_sparse, gate_swa)
    nsel = _indices(indices, B, Hkv, R, q)
    start = _cache_len(start, B, S - R, q, name="start", lo=0)
    gate_sparse = _gate("gate_sparse", gate_sparse, B, Hq, R, d, q)
    gate_swa = _gate("gate_swa", gate_swa, B, Hq, R, d, q)
    sinks = _sinks(sinks, Hq, q)
    p = _sparse_params(block_size, window, scale, merge, softcap, d)
    backend = _backend(backend, "sparse_attention_extend", q, Hkv, block_size=block_size, nsel=nsel,
                       softcap=p.softcap)
    return torch.ops.hysparse.sparse_attention_extend(q, k_shared, v_shared, indices, k_win, v_win, win_pos, start,
                                                      gate_sparse, gate_swa, sinks, *p.op_args(), backend, p.softcap)
