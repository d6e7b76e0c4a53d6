"""Reference sparse layer: the naive math (`kernels/naive/sparse_attention.py`) run in query chunks (each chunk reads
the shared keys up to its last row and the own keys of its rows' windows); the backward differentiates the same
math with autograd, chunk by chunk. Any device.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import naive
from ..params import SparseParams
from .chunks import query_chunks


def _rows(x: Tensor | None, t0: int, t1: int) -> Tensor | None:
    return None if x is None else x[:, :, t0:t1]


def _chunk(q, k_own, v_own, k_shared, v_shared, indices, gate_sparse, gate_swa, t0, t1, window):
    """The inputs one query chunk reads: rows t0..t1-1, shared keys 0..t1-1, own keys k0..t1-1 (the rows' windows),
    and the own keys' positions."""
    k0 = max(0, t0 - window + 1) if window else t1
    return ((q[:, :, t0:t1], k_shared[:, :, :t1], v_shared[:, :, :t1], indices[:, :, t0:t1],
             torch.arange(t0, t1, device=q.device), k_own[:, :, k0:t1], v_own[:, :, k0:t1],
             torch.arange(k0, t1, device=q.device), _rows(gate_sparse, t0, t1), _rows(gate_swa, t0, t1)), k0)


def _cast(ct, tensors):
    return [t.to(ct) if isinstance(t, Tensor) and t.is_floating_point() else t for t in tensors]


def sparse_attention_fwd(q, k_own, v_own, k_shared, v_shared, indices, gate_sparse, gate_swa, sinks, block_size,
                         window, scale, merge, save_branches, *, softcap: float = 0.0):
    """See docs/design.md. Returns out [B, Hq, T, d], lse float32 [B, Hq, T, 2], branch_out [2, B, Hq, T, d]
    (ungated sparse/merged and SWA outputs; empty unless save_branches)."""
    p = SparseParams(block_size, window, scale, merge, softcap)
    B, Hq, T, d = q.shape
    ct = naive.compute_dtype(q.dtype)
    out = torch.empty_like(q)
    lse = torch.empty(B, Hq, T, 2, dtype=torch.float32, device=q.device)
    branch_out = q.new_zeros((2, B, Hq, T, d)) if save_branches else q.new_empty(0)
    sk = None if sinks is None else sinks.to(ct)
    with torch.no_grad():
        for t0, t1 in query_chunks(B, Hq, T):
            args, _ = _chunk(q, k_own, v_own, k_shared, v_shared, indices, gate_sparse, gate_swa, t0, t1, window)
            o, l, branches = naive.sparse_rows(*_cast(ct, args), sk, p)
            out[:, :, t0:t1], lse[:, :, t0:t1] = o.to(q.dtype), l
            for i, b in enumerate(branches if save_branches else ()):
                if b is not None:
                    branch_out[i, :, :, t0:t1] = b.to(q.dtype)
    return out, lse, branch_out


def sparse_attention_bwd(dout, q, k_own, v_own, k_shared, v_shared, indices, gate_sparse, gate_swa, sinks, out, lse,
                         branch_out, block_size, window, scale, merge, *, softcap: float = 0.0):
    """Gradients for every differentiable input (None for absent gates/sinks; zeros for K/V a branch did not read),
    by autograd through `naive.sparse_rows`, chunk by chunk."""
    p = SparseParams(block_size, window, scale, merge, softcap)
    B, Hq, T, d = q.shape
    ct = naive.compute_dtype(q.dtype)
    zeros = lambda t: None if t is None else torch.zeros(t.shape, dtype=ct, device=t.device)  # noqa: E731
    dq = torch.empty_like(q)
    dk_own, dv_own, dk_sh, dv_sh, dg_sp, dg_swa, dsinks = map(zeros, (k_own, v_own, k_shared, v_shared, gate_sparse,
                                                                       gate_swa, sinks))
    for t0, t1 in query_chunks(B, Hq, T):
        args, k0 = _chunk(q, k_own, v_own, k_shared, v_shared, indices, gate_sparse, gate_swa, t0, t1, window)
        with torch.enable_grad():
            args = [a.detach().requires_grad_() if isinstance(a, Tensor) and a.is_floating_point() else a
                    for a in _cast(ct, args)]
            sk = None if sinks is None else sinks.detach().to(ct).requires_grad_()
            o, _, _ = naive.sparse_rows(*args, sk, p)
            wrt = [args[i] for i in (0, 1, 2, 5, 6, 8, 9)] + [sk]  # q, k_sh, v_sh, k_own, v_own, gates, sinks
            live = [x for x in wrt if x is not None]
            grads = iter(torch.autograd.grad(o, live, dout[:, :, t0:t1].to(ct), allow_unused=True))
            gq, gks, gvs, gko, gvo, ggs, ggw, gsk = (None if x is None else next(grads) for x in wrt)
        dq[:, :, t0:t1] = gq.to(q.dtype)
        for acc, g, lo in ((dk_sh, gks, 0), (dv_sh, gvs, 0), (dk_own, gko, k0), (dv_own, gvo, k0)):
            if g is not None:
                acc[:, :, lo:t1] += g
        for acc, g in ((dg_sp, ggs), (dg_swa, ggw)):
            if acc is not None and g is not None:
                acc[:, :, t0:t1] = g
        if dsinks is not None and gsk is not None:
            dsinks += gsk
    cast = lambda a, like: None if a is None else a.to(like.dtype)  # noqa: E731
    return (dq, cast(dk_own, k_own), cast(dv_own, v_own), cast(dk_sh, k_shared), cast(dv_sh, v_shared),
            cast(dg_sp, gate_sparse), cast(dg_swa, gate_swa), cast(dsinks, sinks))


def sparse_attention_decode(q, k_win, v_win, k_shared, v_shared, indices, cache_len, gate_sparse, gate_swa, sinks,
                            block_size, window, scale, merge, *, softcap: float = 0.0):
    """One new token per sequence at position t = cache_len - 1 (docs/design.md, Decode): the naive math as it is.

    q [B, Hq, 1, d]; k_win/v_win [B, Hkv, W, d] ring buffer (slot p % W); k_shared/v_shared [B, Hkv, S, d];
    indices [B, Hkv, 1, nsel]; gates [B, Hq, 1, 1|d] or None; sinks [Hq] or None -> out [B, Hq, 1, d]
    """
    return naive.sparse_attention_decode(q, k_win, v_win, k_shared, v_shared, indices, cache_len.to(q.device),
                                         gate_sparse, gate_swa, sinks, SparseParams(block_size, window, scale, merge,
                                                                                    softcap))


def sparse_attention_extend(q, k_shared, v_shared, indices, k_win, v_win, win_pos, start, gate_sparse, gate_swa,
                            sinks, block_size, window, scale, merge, *, softcap: float = 0.0):
    """R new tokens per row at positions start[b] + r (docs/runtime.md, "Decode and extend"), chunked over them.

    k_shared/v_shared [B, Hkv, S, d] linear, new tokens written; k_win/v_win [B, Hkv, K, d] with win_pos int64
    [B, K] (-1 = empty) the SWA branch's keys; indices [B, Hkv, R, nsel] -> out [B, Hq, R, d]
    """
    p = SparseParams(block_size, window, scale, merge, softcap)
    B, Hq, R, d = q.shape
    ct = naive.compute_dtype(q.dtype)
    out = torch.empty_like(q)
    start = start.to(q.device)
    with torch.no_grad():
        for r0, r1 in query_chunks(B, Hq, R, k_shared.shape[2] + k_win.shape[2]):
            pos = naive.extend_positions(start, r1)[:, r0:]
            args = (q[:, :, r0:r1], k_shared, v_shared, indices[:, :, r0:r1], pos, k_win, v_win, win_pos,
                    _rows(gate_sparse, r0, r1), _rows(gate_swa, r0, r1), sinks)
            o, _, _ = naive.sparse_rows(*_cast(ct, args), p)
            out[:, :, r0:r1] = o.to(q.dtype)
    return out
