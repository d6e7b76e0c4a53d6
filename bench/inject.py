"""Selections injected into a compiled model's sparse layers, for benchmarks (issue 22 item 1: end-to-end rows on
selections with the locality a trained model's have, on a model whose weights are random).

    with injected_selections("tile"):       # or "random", or the paper miniature's selections.npz
        compiled(input_ids=ids)

Inside the block every `hysparse::sparse_attention` call (forward and its backward, eager or under
`torch.compile`: the op's implementation runs at call time) gets, in place of the indices its full layer selected,
indices of the same shape [B, Hkv, T, nsel] drawn once per shape: `random` (each token its own blocks), `tile`
(each 64-token tile draws a pool of 32 blocks and its tokens draw from it: neighbours mostly agree) or a trained
model's (`bench_kernels.trained_selection`). Everything else the model computes is unchanged, the full layers'
own selection included; only the sparse layers attend elsewhere. Not thread-safe; bench only.
"""
from __future__ import annotations

import contextlib

import torch

from .bench_kernels import random_selection, trained_selection

KINDS = ("model", "random", "tile")  # or a path to a selections.npz


class _Injecting:
    """A backend whose sparse-layer forward and backward see the injected indices; everything else passes through."""

    def __init__(self, impl, indices_like):
        self._impl, self._indices_like = impl, indices_like

    def __getattr__(self, name):
        return getattr(self._impl, name)

    def sparse_attention_fwd(self, q, k_own, v_own, k_shared, v_shared, indices, *rest, **kw):
        block_size = rest[3]  # gate_sparse, gate_swa, sinks, block_size, ...
        return self._impl.sparse_attention_fwd(q, k_own, v_own, k_shared, v_shared,
                                               self._indices_like(indices, block_size), *rest, **kw)

    def sparse_attention_bwd(self, dout, q, k_own, v_own, k_shared, v_shared, indices, *rest, **kw):
        block_size = rest[6]  # gate_sparse, gate_swa, sinks, out, lse, branch_out, block_size, ...
        return self._impl.sparse_attention_bwd(dout, q, k_own, v_own, k_shared, v_shared,
                                               self._indices_like(indices, block_size), *rest, **kw)


@contextlib.contextmanager
def injected_selections(kind: str, seed: int = 0):
    """Within the block the sparse layers attend to `kind`'s selections ("model": their own, nothing changes). Yields a
    dict: "calls" counts the sparse-layer forward and backward calls that were given the injected indices, "drawn"
    holds them by (shape, device, block size)."""
    count = {"calls": 0, "drawn": {}}
    if kind == "model":
        yield count
        return
    from hysparse_compile.kernels import ops

    drawn = count["drawn"]

    def indices_like(indices: torch.Tensor, block_size: int) -> torch.Tensor:
        count["calls"] += 1
        key = (tuple(indices.shape), indices.device, block_size)
        if key not in drawn:
            B, Hkv, T, nsel = indices.shape
            if kind in ("random", "tile"):
                g = torch.Generator(device=indices.device).manual_seed(seed)
                drawn[key] = random_selection(B, Hkv, T, block_size, nsel, indices.device, g,
                                              tile_pool=32 if kind == "tile" else 0)
            else:
                idx, why = trained_selection(kind, B, Hkv, T, nsel, indices.device)
                if idx is None:
                    raise ValueError(f"--selections {kind}: {why}")
                drawn[key] = idx
        return drawn[key].to(indices.dtype)

    real = ops._impl

    def injecting(backend, op, q, k, **extra):
        impl = real(backend, op, q, k, **extra)
        return _Injecting(impl, indices_like) if op == "sparse_attention" else impl

    ops._impl = injecting
    try:
        yield count
    finally:
        ops._impl = real
