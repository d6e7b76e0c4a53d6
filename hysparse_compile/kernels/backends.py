"""The backend registry: the one place backends are listed (`BACKENDS`), imported (lazily), asked what they cannot
run, and where `backend="auto"` is decided (`resolve`).

A backend is a package `kernels/<name>/` whose `__init__` implements `Backend` below (docs/design.md, "Backend
interface"): a name, `supports(op, **meta)` (why it cannot run a case, or None), and one function per op, the
positional arguments in the op's schema order, the options added later (`sinks` of the full ops, `softcap`) as
keywords passed only when set. `kernels/ops.py` is the only caller.

    >>> from hysparse_compile.kernels import backends
    >>> backends.resolve("auto", "full_attention", device="cpu", dtype="float32", head_dim=64, group=4).NAME
    'reference'
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Protocol

import torch

from .interpret import triton_interpret

BACKENDS = ("reference", "flex", "triton")
CHOICES = BACKENDS + ("auto",)
OPS = ("full_attention", "sparse_attention", "full_attention_decode", "sparse_attention_decode",
       "full_attention_extend", "sparse_attention_extend")


class Backend(Protocol):
    """What a backend module provides (signatures: docs/design.md, "Backend interface")."""

    NAME: str

    def supports(self, op: str, **meta) -> str | None: ...
    def full_attention_fwd(self, q, k, v, block_size, topk, scale, return_scores, **options): ...
    def full_attention_bwd(self, dout, q, k, v, out, lse, scale, **options): ...
    def sparse_attention_fwd(self, q, k_own, v_own, k_shared, v_shared, indices, gate_sparse, gate_swa, sinks,
                             block_size, window, scale, merge, save_branches, **options): ...
    def sparse_attention_bwd(self, dout, q, k_own, v_own, k_shared, v_shared, indices, gate_sparse, gate_swa, sinks,
                             out, lse, branch_out, block_size, window, scale, merge, **options): ...
    def full_attention_decode(self, q, k_cache, v_cache, cache_len, block_size, topk, scale, **options): ...
    def sparse_attention_decode(self, q, k_win, v_win, k_shared, v_shared, indices, cache_len, gate_sparse,
                                gate_swa, sinks, block_size, window, scale, merge, **options): ...
    def full_attention_extend(self, q, k_cache, v_cache, start, block_size, topk, scale, **options): ...
    def sparse_attention_extend(self, q, k_shared, v_shared, indices, k_win, v_win, win_pos, start, gate_sparse,
                                gate_swa, sinks, block_size, window, scale, merge, **options): ...


def _triton_usable(device: torch.device) -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the platform
        return f"triton is not importable ({e.__class__.__name__}: {e})"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and triton_interpret():
        return None
    return f"triton kernels run on CUDA devices (or on CPU under TRITON_INTERPRET=1), not on {device.type}"


def load(name: str) -> ModuleType:
    """Import a backend module by name (raises ValueError naming the valid ones)."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, CHOICES))}, got {name!r}")
    return importlib.import_module(f"hysparse_compile.kernels.{name}")


def unsupported_reason(name: str, op: str, **meta) -> str | None:
    """Why backend `name` cannot run `op` for these inputs, or None if it can.

    meta: device (torch.device or str), dtype (torch.dtype or str), head_dim, group (Hq // Hkv), and op-specific
    keys such as block_size / nsel.
    """
    device = torch.device(meta.get("device", "cpu"))
    if name == "triton":
        why = _triton_usable(device)
        if why:
            return why
    try:
        module = load(name)
    except ImportError as e:
        return f"backend {name!r} could not be imported ({e})"
    return module.supports(op, **{**meta, "device": device})


def resolve(name: str, op: str, **meta) -> ModuleType:
    """The backend module to run `op` with. "auto": for 16-bit inputs on CUDA, triton when it supports the case,
    else flex when it does, else the reference; float32/float64 inputs and other devices get the reference (the
    kernels' tensor-core dots would round fp32 to TF32, and users who ask for fp32 expect fp32 accuracy). An
    explicit name that cannot run the case raises ValueError with the reason and the backends that can."""
    if name == "auto":
        device = torch.device(meta.get("device", "cpu"))
        half = str(meta.get("dtype", "")).replace("torch.", "") in ("float16", "bfloat16")
        order = ("triton", "flex", "reference") if device.type == "cuda" and half else ("reference",)
        for candidate in order:
            if unsupported_reason(candidate, op, **meta) is None:
                return load(candidate)
        return load("reference")
    why = unsupported_reason(name, op, **meta)
    if why is not None:
        able = [b for b in BACKENDS if b != name and unsupported_reason(b, op, **meta) is None]
        raise ValueError(f"backend={name!r} cannot run {op} here: {why}; backends that can: {', '.join(able)}")
    return load(name)


def for_op(name: str, op: str, **meta) -> str:
    """The backend a call of `op` runs with when the model (or call) asked for backend `name`: `name` itself when
    it can run the case, else "auto" (resolved by the rule of `resolve`). A model compiled for a named backend runs
    that backend's kernels wherever they exist; a case it cannot run (say, a head dim its kernels do not take, or an
    extend call on a backend without extend kernels) takes the `auto` choice instead of failing mid-generation."""
    if name == "auto" or unsupported_reason(name, op, **meta) is None:
        return name
    return "auto"
