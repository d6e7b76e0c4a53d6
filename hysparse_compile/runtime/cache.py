"""`HySparseCache`: the KV cache of a compiled HySparse model (docs/runtime.md, docs/design.md "Decode").

What each layer keeps (`kv_plan.storage`, the plan's own rule, so `cache.nbytes == plan_kv(...).total_bytes`):

| layer | stores | tensor |
|---|---|---|
| full | its post-RoPE K/V for the whole context | `[B, Hkv, capacity, d]` |
| sparse, `kv_sharing="sparse_branch"` with SWA | a ring of its own last `window` tokens (position p in slot p % W) | `[B, Hkv, W, d]`, W = min(window, capacity) |
| sparse, `"both"`, or no SWA branch | nothing: it reads its full layer's cache | — |
| sparse, `"none"` or training-free merge | its own K/V for the whole context | `[B, Hkv, capacity, d]` |

Rows are stored padding-free: the real tokens of row b sit at slots `0 .. lengths[b]-1` (a left-padded prompt is
rolled left, as the compiled graph does for the ops), so block boundaries match the unpadded row.

Two modes: **static** (`max_cache_len` given: everything allocated at once, shapes never change — CUDA graphs and
export) and **dynamic** (allocated on the first write, grown by `grow` tokens at a time). `HySparseCache.from_tensors`
wraps K/V tensors someone else owns (the exporters' graphs take and return the cache as tensors).

What the graph's attention nodes use of a cache (`runtime/layers.py`), the storage protocol: `specs` (a
`LayerKVSpec` per layer), `keys` / `values` (a tensor or None per layer), `full_kv(layer)`, and `failed` (set when
a call fails after writing part of it).

    >>> cache = HySparseCache(compiled, batch_size=2, max_cache_len=4096)          # static
    >>> cache.nbytes == cache.plan().total_bytes       # plan_kv(schedule, ..., batch=2, seq_len=4096, dtype=...)
    True
    >>> out = compiled(ids, past_key_values=cache, use_cache=True)                  # prefill, then decode steps
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..kernels.naive import ring_positions
from ..kv_plan import storage

try:  # a transformers.Cache for HF models (generate, past_key_values); plain object otherwise
    from transformers.cache_utils import Cache as _CacheBase
except Exception:  # pragma: no cover - transformers is optional
    _CacheBase = object

DEFAULT_GROW = 256  # tokens a dynamic cache grows by


@dataclass(frozen=True)
class LayerKVSpec:
    """What one attention layer keeps in the cache."""

    index: int
    role: str  # "full" | "sparse"
    store: str  # "full" | "ring" | "none"
    kv_source: int | None  # full layer whose cache a sparse layer reads
    window: int | None  # SWA window (sparse layers)


def layer_specs(schedule) -> tuple[LayerKVSpec, ...]:
    """What each layer of a schedule stores (`kv_plan.storage`)."""
    return tuple(LayerKVSpec(spec.index, spec.role, storage(spec), spec.kv_source, spec.window)
                 for spec in schedule.layers)


def _param_dtype(param) -> torch.dtype:
    return param.dtype if param is not None else torch.float32


class HySparseCache(_CacheBase):
    """KV cache of a compiled HySparse model (see the module docstring for what each layer keeps).

    compiled: the `hs.compile(...)` result (its schedule and K/V shapes are read from it).
    batch_size, max_cache_len: give both for a static cache (preallocated, fixed shapes); leave max_cache_len None
        for a dynamic cache that grows by `grow` tokens.
    dtype, device: of the cached K/V (default: the model's parameters').
    Attributes: `lengths` int64 [B] real tokens cached per row; `nbytes`; `capacity`; `get_seq_length()` (tokens
    seen, padding included, as HF counts them).
    """

    is_compileable = True

    def __init__(self, compiled, batch_size: int | None = None, max_cache_len: int | None = None, *, dtype=None,
                 device=None, grow: int = DEFAULT_GROW):
        self._init_layout(compiled)
        param = next(iter(compiled.parameters()), None)
        self.device = torch.device(device) if device is not None else (param.device if param is not None
                                                                       else torch.device("cpu"))
        self.dtype = dtype if dtype is not None else (kv_dtype(compiled, self.device) or _param_dtype(param))
        self.failed: str | None = None  # set when a call failed after writing part of the cache (see reset)
        if not isinstance(grow, int) or isinstance(grow, bool) or grow < 1:
            raise ValueError(f"grow must be a positive int (tokens a dynamic cache grows by), got {grow!r}")
        self.grow = grow
        self.static = max_cache_len is not None
        self.keys: list[Tensor | None] = [None] * len(self.specs)
        self.values: list[Tensor | None] = [None] * len(self.specs)
        self._batch, self.capacity, self.seen = 0, 0, 0
        self.lengths: Tensor | None = None
        if self.static:
            for name, value in (("batch_size", batch_size), ("max_cache_len", max_cache_len)):
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError(f"{name} must be a positive int for a static cache, got {value!r}")
            self._allocate(batch_size, max_cache_len)
        elif batch_size is not None:
            if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
                raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
            self._batch = batch_size

    def _init_layout(self, compiled) -> None:
        if _CacheBase is not object:
            try:
                _CacheBase.__init__(self, layers=[])
            except TypeError:  # transformers < 4.56: Cache() takes no layers
                _CacheBase.__init__(self)
        sites = getattr(compiled, "attention_sites", None)
        if not sites:
            raise TypeError(f"HySparseCache needs a compiled HySparse model (hs.compile(...)), got "
                            f"{type(compiled).__name__}")
        self.specs = layer_specs(compiled.schedule)
        self.kv_heads, self.head_dim = sites[0].kv_heads, sites[0].head_dim
        self.schedule = compiled.schedule

    @classmethod
    def from_tensors(cls, compiled, keys: dict, values: dict, lengths: Tensor, seen: int = 0) -> "HySparseCache":
        """A cache over K/V tensors the caller owns, {layer: [B, Hkv, S, d]} for every layer that stores something
        (a full layer's S is the capacity, a ring's its window), row b holding `lengths[b]` tokens: the exporters'
        prefill and decode graphs, which take and return the cache as tensors. Static: never grows."""
        cache = cls.__new__(cls)
        cache._init_layout(compiled)
        missing = [s.index for s in cache.specs if s.store != "none" and s.index not in keys]
        if missing:
            raise ValueError(f"from_tensors: no K/V given for layers {missing}, which store a cache")
        cache.keys = [keys.get(i) for i in range(len(cache.specs))]
        cache.values = [values.get(i) for i in range(len(cache.specs))]
        first = next(t for t in cache.keys if t is not None)
        cache.device, cache.dtype, cache.failed, cache.grow, cache.static = first.device, first.dtype, None, 1, True
        full = [t.shape[2] for t, s in zip(cache.keys, cache.specs) if s.store == "full"]
        cache._batch, cache.capacity, cache.seen = first.shape[0], max(full, default=0), seen
        cache.lengths = lengths
        return cache

    # ------------------------------------------------------------------------------------------- storage
    def _ring_slots(self, spec: LayerKVSpec, capacity: int) -> int:
        return min(spec.window, capacity)

    def _new(self, batch: int, tokens: int) -> Tensor:
        return torch.zeros(batch, self.kv_heads, tokens, self.head_dim, dtype=self.dtype, device=self.device)

    def _allocate(self, batch: int, capacity: int) -> None:
        """(Re)allocate every layer for `capacity` tokens, keeping what is cached."""
        old_k, old_v, old_cap = self.keys, self.values, self.capacity
        for i, spec in enumerate(self.specs):
            if spec.store == "none":
                continue
            slots = capacity if spec.store == "full" else self._ring_slots(spec, capacity)
            k, v = self._new(batch, slots), self._new(batch, slots)
            if old_k[i] is not None:
                if spec.store == "full":
                    k[:, :, :old_cap], v[:, :, :old_cap] = old_k[i], old_v[i]
                else:  # re-lay the ring: position p moves from slot p % W_old to p % W_new
                    k, v = self._relay_ring(old_k[i], old_v[i], k, v)
            self.keys[i], self.values[i] = k, v
        if self.lengths is None:
            self.lengths = torch.zeros(batch, dtype=torch.int64, device=self.device)
        self._batch, self.capacity = batch, capacity

    def _relay_ring(self, k_old: Tensor, v_old: Tensor, k_new: Tensor, v_new: Tensor):
        W_old, W_new = k_old.shape[2], k_new.shape[2]
        pos = ring_positions(self.lengths, W_old)  # [B, W_old] position held by each old slot, -1 if none
        keep = pos >= 0
        slot = torch.where(keep, pos % W_new, torch.zeros_like(pos))
        for b in range(k_old.shape[0]):  # at most W_old <= window entries per row; only when a cache grows
            s, src = slot[b][keep[b]], torch.nonzero(keep[b]).flatten()
            k_new[b, :, s], v_new[b, :, s] = k_old[b, :, src], v_old[b, :, src]
        return k_new, v_new

    def reserve(self, batch: int, tokens: int) -> None:
        """Make room for `tokens` cached tokens per row (dynamic: grow; static: check)."""
        if self.static:
            if batch != self.batch_size:
                raise ValueError(f"the static cache was allocated for batch_size={self.batch_size}, got a batch of "
                                 f"{batch}; make a HySparseCache(compiled, batch_size={batch}, max_cache_len=...)")
            if tokens > self.capacity:
                raise ValueError(f"the static cache holds max_cache_len={self.capacity} tokens per row but this call "
                                 f"needs {tokens}; allocate a larger one (max_cache_len >= {tokens})")
            return
        if self.lengths is not None and batch != self._batch:
            raise ValueError(f"this cache holds {self.batch_size} sequences, got a batch of {batch}")
        if tokens > self.capacity or self.lengths is None:
            capacity = max(self.grow, -(-tokens // self.grow) * self.grow)
            self._allocate(batch, capacity)

    # ------------------------------------------------------------------------------------------- reads
    @property
    def nbytes(self) -> int:
        """Bytes allocated for cached K/V (not the per-row lengths), equal to `plan_kv` at this capacity."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)

    def plan(self):
        """`plan_kv` for this cache's batch, capacity and dtype (its `total_bytes` equals `nbytes`)."""
        from ..kv_plan import plan_kv

        return plan_kv(self.schedule, num_kv_heads=self.kv_heads, head_dim=self.head_dim, batch=max(1, self._batch),
                       seq_len=max(1, self.capacity), dtype=self.dtype, num_layers=len(self.specs))

    def full_kv(self, layer: int) -> tuple[Tensor, Tensor]:
        """The linear cache of a layer that stores its whole context: [B, Hkv, capacity, d] twice."""
        return self.keys[layer], self.values[layer]

    def kv_source_of(self, layer: int) -> int:
        return self.specs[layer].kv_source

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens seen so far per row, padding included (HF's convention)."""
        return self.seen

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.capacity if self.static else -1

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.capacity if self.static else -1

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.seen + query_length, 0

    def __len__(self) -> int:
        return len(self.specs)

    @property
    def batch_size(self) -> int:
        return self._batch

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def is_linear(self) -> list[bool]:
        return [False] * len(self.specs)

    @property
    def is_dummy(self) -> list[bool]:
        return [False] * len(self.specs)

    @property
    def is_initialized(self) -> bool:
        return self.lengths is not None

    @is_initialized.setter
    def is_initialized(self, value) -> None:  # transformers' base __init__ assigns it
        pass

    @property
    def is_sliding(self) -> list[bool]:
        return [s.store == "ring" for s in self.specs]

    def reset(self) -> None:
        """Forget every cached token (keeps the allocation); a cache left inconsistent by a failed call is usable
        again after it."""
        if self.lengths is not None:
            self.lengths.zero_()
        self.seen = 0
        self.failed = None

    def reorder_cache(self, beam_idx: Tensor) -> None:
        """Reorder the rows (beam search)."""
        for i, k in enumerate(self.keys):
            if k is not None:
                self.keys[i] = k.index_select(0, beam_idx.to(k.device))
                self.values[i] = self.values[i].index_select(0, beam_idx.to(k.device))
        if self.lengths is not None:
            self.lengths = self.lengths.index_select(0, beam_idx.to(self.lengths.device))

    def update(self, *args, **kwargs):
        raise NotImplementedError("HySparseCache is written by the compiled HySparse model itself (its full layers "
                                  "and SWA rings); it does not take per-layer K/V from an uncompiled model")

    def __repr__(self) -> str:
        mode = f"static, capacity {self.capacity}" if self.static else f"dynamic, capacity {self.capacity}"
        stores = "".join({"full": "F", "ring": "r", "none": "-"}[s.store] for s in self.specs)
        return (f"HySparseCache({mode}, batch {self.batch_size}, seen {self.seen}, layers {stores!r}, "
                f"{self.nbytes} bytes)")


def kv_dtype(compiled, device: torch.device) -> torch.dtype | None:
    """The dtype the compiled model's K/V come out in on `device`: the parameters' (the first floating one, as the
    projections run in it); None under autocast, where the graph decides (RoPE may upcast), and the layers' writes
    check it instead (`runtime.layers`)."""
    try:
        if torch.is_autocast_enabled(device.type):
            return None
    except RuntimeError:  # a device type autocast does not know (meta)
        pass
    param = next((p for p in compiled.parameters() if p.is_floating_point()), None)
    return param.dtype if param is not None else torch.float32
