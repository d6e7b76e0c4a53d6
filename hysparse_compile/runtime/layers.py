"""The attention calls the compiler's rewrite puts in the graph: `full_layer`, `sparse_layer` and `positions`.

Without a cached call in progress they are the plain prefill ops (`functional.full_attention` /
`functional.sparse_attention`) and the identity: the compiled model's full-sequence forward, training, export.
Inside a cached call (`step(...)`, set by `runtime.run.run_cached`) the same graph nodes read and write the
`HySparseCache` of that call (docs/runtime.md):

| call | full layer | sparse layer |
|---|---|---|
| prefill (empty cache) | prefill op on the rolled, padding-free rows; writes its K/V | prefill op; writes its ring or own K/V |
| decode (1 new token) | writes K/V at `lengths[b]`, `full_attention_decode` over the cache | writes its ring / K/V, `sparse_attention_decode` over the full layer's cache |
| extend (R > 1 new tokens) | writes K/V, `extend.full_attention_extend` | `extend.sparse_attention_extend`, then writes its ring |
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import functional
from . import extend
from .cache import HySparseCache, ring_positions


@dataclass
class Step:
    """One cached call in progress: the cache, the kind of call, and per-row positions."""

    cache: HySparseCache
    mode: str  # "prefill" | "decode" | "extend"
    start: Tensor  # int64 [B]: tokens cached per row before this call (the first new token's position)
    new_lengths: Tensor  # int64 [B]: real (non-pad) new tokens per row
    seen: Tensor  # int64 0-d: columns seen before this call (padding included), for models that number positions
    positions: Tensor  # int64 [B, R]: start[b] + r, the cache slot of each new token (decode / extend)
    cache_len: Tensor  # int32 [B]: start + 1, what the decode ops take (made once per call, not once per layer)


class _CallState(threading.local):
    """The cached call in progress and whether it is known unpadded, per thread: `generate` from a thread pool, a
    streamer's background thread and two models in two threads each see only their own call (docs/runtime.md,
    "Threads"). A `threading.local`, not a `ContextVar`: Dynamo traces attribute reads of a thread-local without a
    graph break (`ContextVar.get` breaks the graph in torch 2.13), so `torch.compile(compiled)` stays one graph."""

    active: Step | None = None
    unpadded: bool = False


_STATE = _CallState()


@contextlib.contextmanager
def step(s: Step):
    """Make `s` the cached call the graph's attention nodes serve, in this thread, while the block runs. If the block
    raises, the cache may hold part of the call's K/V: it is marked failed (`HySparseCache.failed`) and refuses
    further calls until `reset()`."""
    previous, _STATE.active = _STATE.active, s
    try:
        yield s
    except BaseException as error:
        s.cache.failed = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:200]
        raise
    finally:
        _STATE.active = previous


def active() -> Step | None:
    return _STATE.active


@contextlib.contextmanager
def unpadded(known: bool = True):
    """Inside the block the compiled model's call is known to carry no padding (no attention_mask was given, or it
    is all ones): the graph's padding rolls (passes/graph_ops.py) are skipped, two gathers per tensor and layer."""
    previous, _STATE.unpadded = _STATE.unpadded, bool(known)
    try:
        yield
    finally:
        _STATE.unpadded = previous


def padding_free() -> bool:
    """No row of the call in progress can be padded: it is known unpadded, or it is a cached decode / extend call
    (new tokens after the first cached call are never padding; runtime/run.py checks it)."""
    step = _STATE.active
    return _STATE.unpadded or (step is not None and step.mode != "prefill")


# ---------------------------------------------------------------------------------------------- cache writes
def _new_slots(positions: Tensor, like: Tensor) -> Tensor:
    """Scatter index [B, Hkv, R, d] of slots positions[b, r]."""
    B, H, R, d = like.shape
    return positions.view(B, 1, R, 1).expand(B, H, R, d)


def _check_dtype(stored: Tensor, k: Tensor, layer: int) -> None:
    """K/V are stored as computed: a cache of another dtype (a call under autocast, say) is refused at the layer's
    first write, before this layer writes anything (the call then marks the cache failed: see `step`)."""
    if stored.dtype != k.dtype:
        raise TypeError(f"past_key_values stores {stored.dtype} but layer {layer} computes its K/V in {k.dtype}; "
                        f"make the cache with HySparseCache(compiled, dtype={k.dtype})")


def write_linear(cache: HySparseCache, layer: int, k: Tensor, v: Tensor, s: Step) -> None:
    """Store a layer's new K/V [B, Hkv, R, d] at positions start .. start+R-1 (prefill: slots 0..T-1)."""
    kc, vc = cache.full_kv(layer)
    _check_dtype(kc, k, layer)
    if s.mode == "prefill":
        T = k.shape[2]
        kc[:, :, :T].copy_(k)
        vc[:, :, :T].copy_(v)
        return
    idx = _new_slots(s.positions, k)
    kc.scatter_(2, idx, k)
    vc.scatter_(2, idx, v)


def write_ring(cache: HySparseCache, layer: int, k: Tensor, v: Tensor, s: Step) -> None:
    """Store a layer's new K/V in its SWA ring (position p in slot p % W)."""
    kr, vr = cache.keys[layer], cache.values[layer]
    _check_dtype(kr, k, layer)
    W = kr.shape[2]
    if s.mode == "prefill":  # rolled rows: the last W real tokens of row b end at lengths[b] - 1
        pos = ring_positions(s.new_lengths, W)  # [B, W]
        idx = pos.clamp(min=0).view(pos.shape[0], 1, W, 1).expand(k.shape[0], k.shape[1], W, k.shape[3])
        kr.copy_(torch.gather(k, 2, idx.clamp(max=k.shape[2] - 1)))
        vr.copy_(torch.gather(v, 2, idx.clamp(max=k.shape[2] - 1)))
        return
    R = k.shape[2]
    first = max(0, R - W)  # more new tokens than slots: only the last W survive
    k, v = k[:, :, first:], v[:, :, first:]
    idx = torch.remainder(s.positions[:, first:], W).view(k.shape[0], 1, -1, 1).expand_as(k)
    kr.scatter_(2, idx, k)
    vr.scatter_(2, idx, v)


# ---------------------------------------------------------------------------------------------- graph nodes
def full_layer(q: Tensor, k: Tensor, v: Tensor, *, layer: int, block_size: int, topk: int, scale: float,
               backend: str = "auto"):
    """A full layer: q [B, Hq, R, d], k/v [B, Hkv, R, d] (this call's tokens) -> (out, indices int32)."""
    s = _STATE.active
    if s is None or s.mode == "prefill":
        out = functional.full_attention(q, k, v, block_size=block_size, topk=topk, scale=scale, backend=backend)
        if s is not None:
            write_linear(s.cache, layer, k, v, s)
        return out
    write_linear(s.cache, layer, k, v, s)
    kc, vc = s.cache.full_kv(layer)
    if s.mode == "decode":
        return functional.full_attention_decode(q, kc, vc, s.cache_len, block_size=block_size, topk=topk,
                                                scale=scale, backend=backend)
    return extend.full_attention_extend(q, kc, vc, s.start, block_size, topk, scale)


def _decode_window(window: int | None, slots: int) -> int | None:
    """The window the decode op is told: never more than the slots it reads (equivalent: a buffer of W < window
    slots only exists while fewer than W tokens were seen, and then every one of them is in the window). A traced
    (symbolic) slot count is a linear cache being exported, which holds the whole context: the window as it is."""
    if window is None or isinstance(slots, torch.SymInt):
        return window
    return min(window, slots)


def sparse_layer(q: Tensor, k_own: Tensor, v_own: Tensor, k_shared: Tensor, v_shared: Tensor, indices: Tensor, *,
                 layer: int, block_size: int, window: int | None, gate_sparse=None, gate_swa=None, sinks=None,
                 scale: float | None = None, merge: bool = False, save_branches: bool = False,
                 backend: str = "auto") -> Tensor:
    """A sparse layer: q [B, Hq, R, d], this call's K/V as the compiler wired them (see rewrite.py), the full
    layer's indices int32 [B, Hkv, R, nsel] -> out [B, Hq, R, d]."""
    s = _STATE.active
    kwargs = dict(block_size=block_size, window=window, gate_sparse=gate_sparse, gate_swa=gate_swa, sinks=sinks,
                  scale=scale, merge=merge, backend=backend)
    if s is None or s.mode == "prefill":
        out = functional.sparse_attention(q, k_own, v_own, k_shared, v_shared, indices, save_branches=save_branches,
                                          **kwargs)
        if s is not None:
            store = s.cache.specs[layer].store
            if store == "full":
                write_linear(s.cache, layer, k_shared, v_shared, s)  # the layer's own K/V (merge / "none")
            elif store == "ring":
                write_ring(s.cache, layer, k_own, v_own, s)
        return out
    cache = s.cache
    spec = cache.specs[layer]
    if spec.store == "full":  # own whole context: it is both the shared cache and the window
        write_linear(cache, layer, k_shared, v_shared, s)
        k_sh, v_sh = cache.full_kv(layer)
        k_win, v_win = k_sh, v_sh
    else:
        k_sh, v_sh = cache.full_kv(spec.kv_source)
        k_win, v_win = (cache.keys[layer], cache.values[layer]) if spec.store == "ring" else (k_sh, v_sh)
    if s.mode == "decode":
        if spec.store == "ring":
            write_ring(cache, layer, k_own, v_own, s)
        kwargs["window"] = _decode_window(window, k_win.shape[2])
        return functional.sparse_attention_decode(q, k_win, v_win, k_sh, v_sh, indices, s.cache_len, **kwargs)
    if spec.store == "ring":  # the ring's old slots, then this call's tokens
        win_pos = torch.cat([ring_positions(s.start, k_win.shape[2]), s.positions], dim=1)
        k_w, v_w = torch.cat([k_win, k_own.to(k_win.dtype)], 2), torch.cat([v_win, v_own.to(v_win.dtype)], 2)
    else:  # a linear cache: position = slot
        k_w, v_w = k_win, v_win
        win_pos = torch.arange(k_win.shape[2], device=q.device).view(1, -1).expand(q.shape[0], -1)
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    out = extend.sparse_attention_extend(q, k_sh, v_sh, indices, k_w, v_w, win_pos, s.start, block_size=block_size,
                                         window=window, gate_sparse=gate_sparse, gate_swa=gate_swa, sinks=sinks,
                                         scale=scale, merge=merge)
    if spec.store == "ring":
        write_ring(cache, layer, k_own, v_own, s)
    return out


def positions(x: Tensor) -> Tensor:
    """A model's own `arange(T)` position numbers (models without a position input), shifted by the columns a
    cached call has already seen."""
    s = _STATE.active
    return x if s is None or s.mode == "prefill" else x + s.seen.to(x.dtype)
