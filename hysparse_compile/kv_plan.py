"""KV memory plan: bytes of KV cache per layer for a schedule, against full attention everywhere.

What each layer keeps during decode (docs/design.md "Decode", docs/runtime.md "The cache"; `storage(spec)` is the rule,
and the runtime's `HySparseCache` allocates by it):

- full layer: its whole K/V cache, ``2 * Hkv * d * itemsize * seq_len * batch`` bytes;
- sparse layer, ``kv_sharing="sparse_branch"`` (the paper's default): the sparse branch reads the preceding full
  layer's cache, so the layer stores only the K/V of its SWA ring buffer, ``min(window, seq_len)`` tokens
  (nothing at all when ``swa=False``);
- sparse layer, ``kv_sharing="both"``: both branches read the full layer's cache, nothing is stored;
- sparse layer, ``kv_sharing="none"`` or the training-free merge: the sparse branch reads the layer's
  own K/V, so the layer keeps a full cache of its own (its window is read from that same cache).

The selected block indices each full layer hands to its sparse layers during decode (``int32 [B, Hkv, 1, nsel]``)
are listed on their own line (``indices_bytes``) and are *not* counted in ``total_bytes`` or in the budget
searches: they are a per-step workspace of a few KiB, not cache that grows with context.

All arithmetic is on Python ints, so totals and the budget searches are exact.

Example::

    from hysparse_compile import Schedule, plan_kv
    plan = plan_kv(Schedule.preset("hysparse-80b-a3b"), num_kv_heads=4, head_dim=128,
                   batch=1, seq_len=32768, dtype="bfloat16")
    assert plan.total_bytes == 5 * 2048 * 32768 + 44 * 2048 * 128   # 5 full caches + 44 SWA ring buffers
    print(plan)                                                       # per-layer table against full attention
    plan.max_seq_len("80GiB", batch=1), plan.max_seq_len("80GiB", batch=1, baseline=True)  # (8387481, 855980)
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

# Bytes per element of the dtypes a KV cache is kept in (torch dtype names, plus common short names).
DTYPE_BYTES = {
    "float64": 8, "double": 8, "fp64": 8,
    "float32": 4, "float": 4, "fp32": 4,
    "bfloat16": 2, "bf16": 2,
    "float16": 2, "half": 2, "fp16": 2,
    "float8_e4m3fn": 1, "float8_e5m2": 1, "float8_e4m3fnuz": 1, "float8_e5m2fnuz": 1, "fp8": 1,
    "int8": 1, "uint8": 1,
}
INDEX_BYTES = 4  # int32 block indices

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a positive int, got {value!r} ({type(value).__name__})")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return value


def dtype_bytes(dtype) -> int:
    """Bytes per element of ``dtype`` (a torch dtype or its name: "bfloat16", "bf16", "float16", "float32", ...)."""
    name = str(dtype).removeprefix("torch.").lower() if not isinstance(dtype, bool) else None
    if name not in DTYPE_BYTES:
        valid = ", ".join(sorted(DTYPE_BYTES))
        raise ValueError(f"dtype: unknown KV cache dtype {dtype!r}; valid: {valid}")
    return DTYPE_BYTES[name]


def parse_bytes(value) -> int:
    """A memory size as an exact int: ``80_000_000_000``, ``"80GB"`` (10**9) or ``"80GiB"`` (2**30), ``"1.5TiB"``."""
    if isinstance(value, bool):
        raise ValueError(f"budget must be a byte count like 80GiB or 80GB, got {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"budget must be positive, got {value}")
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"budget must be a byte count like 80GiB, 80GB or 85899345920, got {value!r}")
    whole, _, frac = match.group(1).partition(".")
    scale = _UNITS[unit]
    num = (int(whole) * 10 ** len(frac) + int(frac or 0)) * scale  # exact: no float rounding
    if num % 10 ** len(frac):
        raise ValueError(f"budget {value!r} is not a whole number of bytes")
    out = num // 10 ** len(frac)
    if out <= 0:
        raise ValueError(f"budget must be positive, got {value!r}")
    return out


def format_bytes(n: int) -> str:
    """``n`` bytes in binary units, e.g. ``320.0 MiB``."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


@dataclass(frozen=True)
class LayerKV:
    """One layer's row of the plan: what it stores and how many bytes (for the plan's batch and seq_len)."""

    index: int
    role: str  # "full" | "sparse"
    stores: str  # e.g. "full cache", "SWA ring buffer of 128 tokens", "nothing (reads layer 0)"
    full_tokens: int  # 1 when the layer keeps one K/V entry per context token, else 0
    ring_tokens: int  # fixed-size ring buffer length (window), 0 if none
    bytes: int


@dataclass(frozen=True)
class KVPlan:
    """KV cache bytes per layer and in total, against the same model with full attention in every layer."""

    per_layer: tuple[LayerKV, ...]
    num_kv_heads: int
    head_dim: int
    batch: int
    seq_len: int
    dtype: str
    itemsize: int
    nsel_per_full_layer: tuple[int, ...]  # topk // block_size of each full layer (for the indices line)

    @property
    def token_bytes(self) -> int:
        """K and V of one token in one layer for one sequence: ``2 * Hkv * d * itemsize``."""
        return 2 * self.num_kv_heads * self.head_dim * self.itemsize

    @property
    def total_bytes(self) -> int:
        return sum(row.bytes for row in self.per_layer)

    @property
    def baseline_bytes(self) -> int:
        """Full attention everywhere: every layer keeps its whole cache."""
        return len(self.per_layer) * self.token_bytes * self.seq_len * self.batch

    @property
    def ratio(self) -> float:
        """``baseline_bytes / total_bytes`` (how many times smaller the HySparse cache is)."""
        return self.baseline_bytes / self.total_bytes if self.total_bytes else float("inf")

    @property
    def indices_bytes(self) -> int:
        """Decode-time selected-block indices, int32 ``[B, Hkv, 1, nsel]`` per full layer (not in total_bytes)."""
        return sum(INDEX_BYTES * self.batch * self.num_kv_heads * n for n in self.nsel_per_full_layer)

    def bytes_for(self, batch: int, seq_len: int, *, baseline: bool = False) -> int:
        """Total KV bytes of this model at another ``batch`` and ``seq_len`` (exact)."""
        _positive_int("batch", batch)
        _positive_int("seq_len", seq_len)
        if baseline:
            return len(self.per_layer) * self.token_bytes * seq_len * batch
        tokens = sum(r.full_tokens * seq_len + min(r.ring_tokens, seq_len) for r in self.per_layer)
        return tokens * self.token_bytes * batch

    def max_batch(self, budget_bytes, seq_len: int | None = None, *, baseline: bool = False) -> int:
        """Largest batch whose KV cache fits ``budget_bytes`` at ``seq_len`` (default: the plan's); 0 if none.

        ``baseline=True`` answers for full attention everywhere. ``budget_bytes`` is an int or "80GiB"/"80GB".
        """
        budget = parse_bytes(budget_bytes)
        seq_len = self.seq_len if seq_len is None else _positive_int("seq_len", seq_len)
        per_sequence = self.bytes_for(1, seq_len, baseline=baseline)
        return budget // per_sequence

    def max_seq_len(self, budget_bytes, batch: int | None = None, *, baseline: bool = False) -> int:
        """Largest context (tokens) whose KV cache fits ``budget_bytes`` at ``batch`` (default: the plan's); 0 if none.

        Bytes grow monotonically with context (ring buffers stop growing at their window), so an exact integer
        bisection finds the answer. ``baseline=True`` answers for full attention everywhere.
        """
        budget = parse_bytes(budget_bytes)
        batch = self.batch if batch is None else _positive_int("batch", batch)
        fits = lambda n: self.bytes_for(batch, n, baseline=baseline) <= budget  # noqa: E731
        if not fits(1):
            return 0
        growing = sum(r.full_tokens for r in self.per_layer) if not baseline else len(self.per_layer)
        if growing == 0:
            raise ValueError("max_seq_len: no layer keeps a full cache, so every context fits")
        lo, hi = 1, budget // (self.token_bytes * batch * growing) + 1  # fits(lo) and not fits(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo

    def table(self, title: str | None = None):
        """A ``rich.table.Table`` of the plan: one row per layer, then the totals against full attention."""
        from rich.table import Table

        full_layer = self.token_bytes * self.seq_len * self.batch
        table = Table(title=title or (f"KV cache plan: batch {self.batch}, context {self.seq_len}, {self.dtype}, "
                                      f"{self.num_kv_heads} KV heads x d={self.head_dim}"))
        table.add_column("layer", justify="right")
        table.add_column("role")
        table.add_column("stores")
        table.add_column("bytes", justify="right")
        table.add_column("full attention", justify="right")
        for row in self.per_layer:
            table.add_row(str(row.index), row.role, row.stores, format_bytes(row.bytes), format_bytes(full_layer))
        table.add_section()
        table.add_row("", "", "total KV cache", f"{format_bytes(self.total_bytes)}",
                      format_bytes(self.baseline_bytes), style="bold")
        table.add_row("", "", f"{self.ratio:.2f}x less than full attention", "", "")
        table.add_row("", "", "decode indices int32 [B, Hkv, 1, nsel] (not counted)",
                      format_bytes(self.indices_bytes), "")
        return table

    def summary(self) -> str:
        """One line: total vs full attention."""
        return (f"KV cache {format_bytes(self.total_bytes)} ({self.total_bytes} B) vs full attention "
                f"{format_bytes(self.baseline_bytes)} ({self.baseline_bytes} B): {self.ratio:.2f}x smaller")

    def __str__(self) -> str:
        from rich.console import Console

        buffer = io.StringIO()
        Console(file=buffer, width=110, force_terminal=False, color_system=None).print(self.table())
        return buffer.getvalue() + self.summary()


STORES = ("full", "ring", "none")


def storage(spec) -> str:
    """What one layer keeps during decode (the module docstring's rules; `runtime.cache.HySparseCache` allocates
    by it): "full" (its own K/V for the whole context: full layers, and sparse layers in training-free merge or
    `kv_sharing="none"`), "ring" (the SWA ring of its last `window` tokens: the paper's sparse layer) or "none"
    (it reads its full layer's cache: `kv_sharing="both"` or no SWA branch). spec: a `LayerSpec`."""
    if spec.role == "full":
        return "full"
    sharing = getattr(spec, "kv_sharing", "sparse_branch")
    if bool(getattr(spec, "merge", False)) or sharing == "none":
        return "full"
    if sharing == "both" or spec.window is None:
        return "none"
    if sharing != "sparse_branch":
        raise ValueError(f"layer {spec.index}: unknown kv_sharing {sharing!r}; valid: sparse_branch, none, both")
    return "ring"


def _layer_row(spec, token_bytes: int, batch: int, seq_len: int) -> LayerKV:
    full = token_bytes * seq_len * batch
    store = storage(spec)
    if spec.role == "full":
        return LayerKV(spec.index, "full", "full cache", 1, 0, full)
    if store == "full":
        why = "training-free merge" if bool(getattr(spec, "merge", False)) else "kv_sharing=none"
        return LayerKV(spec.index, "sparse", f"full cache (own K/V, {why})", 1, 0, full)
    if store == "none":
        return LayerKV(spec.index, "sparse", f"nothing (reads layer {spec.kv_source})", 0, 0, 0)
    window = int(spec.window)
    ring = min(window, seq_len)
    stores = f"SWA ring buffer of {window} tokens (sparse branch reads layer {spec.kv_source})"
    return LayerKV(spec.index, "sparse", stores, 0, window, token_bytes * ring * batch)


def plan_kv(schedule, *, num_kv_heads: int, head_dim: int, batch: int, seq_len: int, dtype,
            num_layers: int | None = None) -> KVPlan:
    """KV cache plan of ``schedule`` for a model with ``num_kv_heads`` KV heads of size ``head_dim``.

    ``dtype`` is the cache dtype (torch dtype or name), ``batch`` sequences of ``seq_len`` tokens. ``num_layers``,
    if given, must equal ``len(schedule)`` (a guard that the schedule matches the model). Returns a :class:`KVPlan`.
    """
    _positive_int("num_kv_heads", num_kv_heads)
    _positive_int("head_dim", head_dim)
    _positive_int("batch", batch)
    _positive_int("seq_len", seq_len)
    itemsize = dtype_bytes(dtype)
    layers = tuple(schedule.layers)
    if num_layers is not None:
        _positive_int("num_layers", num_layers)
        if num_layers != len(layers):
            raise ValueError(f"num_layers: the model has {num_layers} attention layers but the schedule has "
                             f"{len(layers)}; use a schedule with {num_layers} layers")
    token_bytes = 2 * num_kv_heads * head_dim * itemsize
    rows = tuple(_layer_row(spec, token_bytes, batch, seq_len) for spec in layers)
    nsel = tuple(spec.topk // spec.block_size for spec in layers if spec.role == "full")
    name = str(dtype).removeprefix("torch.")
    return KVPlan(rows, num_kv_heads, head_dim, batch, seq_len, name, itemsize, nsel)
