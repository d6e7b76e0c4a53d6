"""The op contract as values: what a full-attention and a sparse-layer op are told besides their tensors.

One frozen dataclass per layer kind, validated once, where a call is made (`functional`, `runtime.layers`), and
carried as one value by everything above the kernels: the naive math (`kernels/naive/`), the reference backend,
the runtime's decode / extend calls, and the exporters (which bind an op's arguments back into these with
`ops.bind`). The custom ops themselves (`kernels/ops.py`) take the fields as plain schema arguments, in the order
`op_args()` gives (a `torch.library` schema cannot take a Python object; new fields are appended with defaults so
older call sites keep working).

What the tensors say is not repeated here: gates, sinks, the K/V a layer reads (`kv_sharing`, SWA on or off) and
the training-free mode are expressed by what is passed (docs/design.md, "Ops"), so a value here cannot disagree
with them.

    >>> FullParams(block_size=16, topk=64, scale=0.125).nsel
    4
    >>> SparseParams(block_size=16, window=0, scale=0.125, softcap=30.0).has_window
    False
"""
from __future__ import annotations

import math
from dataclasses import dataclass


def _int(name: str, value, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_block_size(block_size) -> int:
    _int("block_size", block_size)
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16 (16, 32, 64, 128, ...), got {block_size}")
    return block_size


def check_topk(topk, block_size: int) -> int:
    _int("topk", topk)
    if topk % block_size:
        raise ValueError(f"topk must be a positive multiple of block_size={block_size}, got {topk}")
    return topk


def check_window(window) -> int:
    """window: None (no SWA branch) or a positive int -> the op's int (0 = none)."""
    return 0 if window is None else _int("window", window)


def resolve_scale(scale, head_dim: int) -> float:
    """None -> 1/sqrt(head_dim); else a positive finite float."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite float or None (1/sqrt(d)), got {scale!r}")
    return float(scale)


def check_softcap(softcap) -> float:
    """None or 0 (off) or a positive finite float (logits become softcap * tanh(logits / softcap)) -> float."""
    if softcap is None:
        return 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not math.isfinite(softcap) or softcap < 0:
        raise ValueError(f"softcap must be None (off) or a positive finite float (logits -> softcap * "
                         f"tanh(logits / softcap), as Gemma 2 caps them), got {softcap!r}")
    return float(softcap)


@dataclass(frozen=True)
class FullParams:
    """A full layer's op parameters (docs/design.md, `full_attention`).

    block_size: key block (a power of two >= 16); topk: tokens selected per query and KV group, a multiple of
    block_size (nsel = topk // block_size blocks); scale: logit scale (resolved, > 0); softcap: 0.0 (off) or c > 0,
    logits -> c * tanh(logits / c) before the softmax (Gemma 2). Per-head sinks are a tensor input (`sinks`).
    """

    block_size: int
    topk: int
    scale: float
    softcap: float = 0.0

    @property
    def nsel(self) -> int:
        return self.topk // self.block_size

    def op_args(self) -> tuple:
        """The custom op's scalar arguments in schema order: block_size, topk, scale (softcap is a keyword)."""
        return self.block_size, self.topk, self.scale

    @classmethod
    def checked(cls, *, block_size, topk, scale, head_dim: int, softcap=None) -> "FullParams":
        """Validated parameters (errors name the field): scale None -> 1/sqrt(head_dim), softcap None -> off."""
        block_size = check_block_size(block_size)
        return cls(block_size, check_topk(topk, block_size), resolve_scale(scale, head_dim), check_softcap(softcap))


@dataclass(frozen=True)
class SparseParams:
    """A sparse layer's op parameters (docs/design.md, `sparse_attention`).

    block_size: the full layer's key block; window: SWA window in tokens, 0 = no SWA branch; scale: logit scale;
    merge: training-free single softmax over selected blocks and window; softcap: 0.0 (off) or c > 0, applied to
    both branches' logits. Gates, sinks and which K/V are shared are tensor inputs.
    """

    block_size: int
    window: int
    scale: float
    merge: bool = False
    softcap: float = 0.0

    @property
    def has_window(self) -> bool:
        return self.window > 0

    def op_args(self) -> tuple:
        """The custom op's scalar arguments in schema order: block_size, window, scale, merge."""
        return self.block_size, self.window, self.scale, self.merge

    def with_window(self, window: int) -> "SparseParams":
        return SparseParams(self.block_size, window, self.scale, self.merge, self.softcap)

    @classmethod
    def checked(cls, *, block_size, window, scale, head_dim: int, merge=False, softcap=None) -> "SparseParams":
        """Validated parameters: window None -> 0 (no SWA branch), scale None -> 1/sqrt(head_dim)."""
        return cls(check_block_size(block_size), check_window(window), resolve_scale(scale, head_dim), bool(merge),
                   check_softcap(softcap))


__all__ = ["FullParams", "SparseParams", "check_block_size", "check_topk", "check_window", "resolve_scale",
           "check_softcap"]
