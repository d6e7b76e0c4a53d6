"""The attention calls the compiler's rewrite puts in the graph: `full_layer`, `sparse_layer` and `positions`.

Each takes the model's call in progress as `call` (a `runtime.state.CallState`, passed by the graph; None when these
functions are called on their own). Without a cached call in progress they are the plain prefill ops
(`functional.full_attention` / `functional.sparse_attention`) and the identity: the compiled model's full-sequence
forward, training, export. Inside a cached call (`call.step(...)`, set by `HySparseModel` around the graph call) the
same graph nodes read and write the cache of that call (docs/runtime.md):

| call | full layer | sparse layer |
|---|---|---|
| prefill (empty cache) | prefill op on the rolled, padding-free rows; writes its K/V | prefill op; writes its ring or own K/V |
| decode (1 new token) | writes K/V at `lengths[b]`, `full_attention_decode` over the cache | writes its ring / K/V, `sparse_attention_decode` over the full layer's cache |
| extend (R > 1 new tokens) | writes K/V, `extend.full_attention_extend` | `extend.sparse_attention_extend`, then writes its ring |

The layer's parameters arrive as the node's keywords (readable in the printed graph) and travel on as one value
(`kernels.params.FullParams` / `SparseParams`); `softcap` and a full layer's `sinks` are optional.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from .. import functional
from ..kernels import backends
from ..kernels.naive import ring_positions
from ..kernels.params import FullParams, SparseParams
from . import extend
from .state import CallState, Step

__all__ = ["full_layer", "sparse_layer", "positions", "write_linear", "write_ring", "Step", "CallState"]


def _active(call: CallState | None) -> Step | None:
    return None if call is None else call.active


def _extend_backend(backend: str, op: str, q: Tensor, k: Tensor) -> str:
    """The model's backend for an extend op, or `auto` where that backend has no extend kernel."""
    return backends.for_op(backend, op, device=q.device, dtype=q.dtype, head_dim=q.shape[-1],
                           group=q.shape[1] // k.shape[1])


# ---------------------------------------------------------------------------------------------- cache writes
# Decode / extend writes: one Triton launch per layer (`kernels.triton.cache_write`) for CUDA tensors ("cuda"), for
# any tensor ("any": tests, the CPU under TRITON_INTERPRET=1), or never ("off": two `scatter_`s per layer, as
# before; bench_decode --writes scatter times that). While torch.compile, torch.export or jit tracing run, always
# the scatters (a trace records torch ops, not a direct kernel launch).
FUSED_WRITES = "cuda"


@functools.cache
def _cache_write_module():
    """`kernels.triton.cache_write`, imported once, or None where Triton cannot be imported."""
    try:
        from ..kernels.triton import cache_write
    except ImportError:  # pragma: no cover - a platform without triton: the scatters
        return None
    return cache_write


def _write_fused(k: Tensor, v: Tensor, kc: Tensor, vc: Tensor, positions: Tensor, ring: int | None = None) -> bool:
    """Store k/v at `positions` (`% ring`) of kc/vc in one launch where FUSED_WRITES and the tensors allow it;
    False (nothing written) where the caller's scatters must do it."""
    if functional.tracing() or not (FUSED_WRITES == "any" or (FUSED_WRITES == "cuda" and k.is_cuda)):
        return False
    fused = _cache_write_module()
    if fused is None or not fused.fused_write_supported(k, v, kc, vc):
        return False
    fused.write_kv(k, v, kc, vc, positions, ring=ring)
    return True


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


def write_linear(cache, layer: int, k: Tensor, v: Tensor, s: Step) -> None:
    """Store a layer's new K/V [B, Hkv, R, d] at positions start .. start+R-1 (prefill: slots 0..T-1)."""
    kc, vc = cache.full_kv(layer)
    _check_dtype(kc, k, layer)
    if s.mode == "prefill":
        T = k.shape[2]
        kc[:, :, :T].copy_(k)
        vc[:, :, :T].copy_(v)
        return
    if _write_fused(k, v, kc, vc, s.positions):
        return
    idx = _new_slots(s.positions, k)
    kc.scatter_(2, idx, k)
    vc.scatter_(2, idx, v)


def write_ring(cache, layer: int, k: Tensor, v: Tensor, s: Step) -> None:
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
    if _write_fused(k, v, kr, vr, s.positions[:, first:], ring=W):
        return
    idx = torch.remainder(s.positions[:, first:], W).view(k.shape[0], 1, -1, 1).expand_as(k)
    kr.scatter_(2, idx, k)
    vr.scatter_(2, idx, v)


# ---------------------------------------------------------------------------------------------- graph nodes
def full_layer(q: Tensor, k: Tensor, v: Tensor, *, layer: int, block_size: int, topk: int, scale: float,
               softcap: float | None = None, sinks: Tensor | None = None, backend: str = "auto",
               call: CallState | None = None):
    """A full layer: q [B, Hq, R, d], k/v [B, Hkv, R, d] (this call's tokens), sinks [Hq] or None
    -> (out, indices int32)."""
    s = _active(call)
    p = FullParams.checked(block_size=block_size, topk=topk, scale=scale, softcap=softcap, head_dim=q.shape[-1])
    kw = dict(block_size=p.block_size, topk=p.topk, scale=p.scale, softcap=p.softcap, sinks=sinks, backend=backend)
    if s is None or s.mode == "prefill":
        out = functional.full_attention(q, k, v, **kw)
        if s is not None:
            write_linear(s.cache, layer, k, v, s)
        return out
    write_linear(s.cache, layer, k, v, s)
    kc, vc = s.cache.full_kv(layer)
    if s.mode == "decode":
        return functional.full_attention_decode(q, kc, vc, s.cache_len, **kw)
    return extend.full_attention_extend(q, kc, vc, s.start, p.block_size, p.topk, p.scale, softcap=p.softcap,
                                        sinks=sinks, backend=_extend_backend(backend, "full_attention_extend", q, k))


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
                 softcap: float | None = None, backend: str = "auto", call: CallState | None = None) -> Tensor:
    """A sparse layer: q [B, Hq, R, d], this call's K/V as the compiler wired them (see rewrite.py), the full
    layer's indices int32 [B, Hkv, R, nsel] -> out [B, Hq, R, d]."""
    s = _active(call)
    p = SparseParams.checked(block_size=block_size, window=window, scale=scale, merge=merge, softcap=softcap,
                             head_dim=q.shape[-1])
    kwargs = dict(block_size=p.block_size, window=window, gate_sparse=gate_sparse, gate_swa=gate_swa, sinks=sinks,
                  scale=p.scale, merge=p.merge, softcap=p.softcap, backend=backend)
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
    kwargs["backend"] = _extend_backend(backend, "sparse_attention_extend", q, k_sh)
    out = extend.sparse_attention_extend(q, k_sh, v_sh, indices, k_w, v_w, win_pos, s.start, **kwargs)
    if spec.store == "ring":
        write_ring(cache, layer, k_own, v_own, s)
    return out


def positions(x: Tensor, call: CallState | None = None) -> Tensor:
    """A model's own `arange(T)` position numbers (models without a position input), shifted by the columns a
    cached call has already seen."""
    s = _active(call)
    return x if s is None or s.mode == "prefill" else x + s.seen.to(x.dtype)
