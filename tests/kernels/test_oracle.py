"""The oracle checks itself: the dense (differentiable, vectorized) oracle equals the loop oracle in values and in
float64 autograd gradients; the decode and extend forms equal the prefill rows they stand for; the full layer's
output equals torch's SDPA. tests/oracle.py never imports the package, so none of this leans on its code."""
from __future__ import annotations

import pytest
import torch

from grid import CASES, alternate, full_qkv, point, sparse_leaves, wire
from oracle import (dense_full, dense_sparse, max_rel_err, oracle_full, oracle_full_extend, oracle_sparse,
                    oracle_sparse_decode, oracle_sparse_rows, random_indices, rel_err)

F64 = torch.float64
CASE_POINTS = [point(c, sample=alternate(i, 0), id=c.name) for i, c in enumerate(CASES)]


@pytest.mark.parametrize("case", CASE_POINTS)
def test_dense_sparse_oracle_equals_the_loop_oracle(case):
    w = wire(case, sparse_leaves(case, F64))
    args = (w["q"], w["k_own"], w["v_own"], w["k_shared"], w["v_shared"], w["indices"], case.block, case.window,
            w["gate_sparse"], w["gate_swa"], w["sinks"])
    assert rel_err(dense_sparse(*args, merge=case.merge), oracle_sparse(*args, merge=case.merge)) < 1e-13


@pytest.mark.parametrize("case", CASE_POINTS)
def test_dense_full_oracle_equals_the_loop_oracle(case):
    q, k, v = full_qkv(case, F64)
    assert rel_err(dense_full(q, k, v), oracle_full(q, k, v, case.block, case.topk)[0]) < 1e-13


def _tiny(gen, merge):
    """B=2, Hq=4, Hkv=2, T=13, d=8, block 4 (4 blocks, 2 selected), window 3; gates and sinks unless merge."""
    B, Hq, Hkv, T, d, bs = 2, 4, 2, 13, 8, 4
    r = lambda *s: torch.randn(*s, generator=gen, dtype=F64).requires_grad_()  # noqa: E731
    x = dict(q=r(B, Hq, T, d), k_own=r(B, Hkv, T, d), v_own=r(B, Hkv, T, d), k_shared=r(B, Hkv, T, d),
             v_shared=r(B, Hkv, T, d), gate_sparse=None, gate_swa=None, sinks=r(Hq))
    if merge:
        x["k_own"], x["v_own"] = x["k_shared"], x["v_shared"]
    else:
        x["gate_sparse"] = torch.sigmoid(r(B, Hq, T, d)).detach().requires_grad_()
        x["gate_swa"] = torch.sigmoid(r(B, Hq, T, 1)).detach().requires_grad_()
    return x, random_indices(B, Hkv, T, bs, 2, gen), bs


@pytest.mark.parametrize("merge", [False, True], ids=["gated", "merge"])
def test_dense_oracle_gradients_equal_the_loop_oracle_gradients(gen, merge):
    x, idx, bs = _tiny(gen, merge)
    leaves = list(dict.fromkeys(v for v in x.values() if v is not None))  # shared K/V once
    dout = torch.randn(x["q"].shape, generator=gen, dtype=F64)
    args = (x["q"], x["k_own"], x["v_own"], x["k_shared"], x["v_shared"], idx, bs, 3, x["gate_sparse"],
            x["gate_swa"], x["sinks"])
    loop = torch.autograd.grad(oracle_sparse(*args, merge=merge), leaves, dout)
    dense = torch.autograd.grad(dense_sparse(*args, merge=merge), leaves, dout)
    for a, b in zip(loop, dense):
        assert a.abs().max() > 0 and max_rel_err(b, a) < 1e-12
    q, k, v = x["q"], x["k_shared"], x["v_shared"]
    loop = torch.autograd.grad(oracle_full(q, k, v, bs, 8)[0], (q, k, v), dout)
    dense = torch.autograd.grad(dense_full(q, k, v), (q, k, v), dout)
    for a, b in zip(loop, dense):
        assert a.abs().max() > 0 and max_rel_err(b, a) < 1e-12


@pytest.mark.parametrize("merge", [False, True], ids=["gated", "merge"])
def test_decode_oracle_reads_the_ring_as_the_prefill_row(gen, merge):
    """oracle_sparse_decode (window from a ring buffer, position p in slot p % W) equals the prefill oracle's row."""
    x, idx, bs = _tiny(gen, merge)
    x = {k: None if v is None else v.detach() for k, v in x.items()}
    B, W = 2, 5
    full = oracle_sparse(x["q"], x["k_own"], x["v_own"], x["k_shared"], x["v_shared"], idx, bs, 3,
                         x["gate_sparse"], x["gate_swa"], x["sinks"], merge=merge)
    for t in (0, 6, 12):
        ring_k, ring_v = (torch.full((B, 2, W, 8), 1e3, dtype=F64) for _ in range(2))
        for p in range(max(0, t - W + 1), t + 1):
            ring_k[:, :, p % W], ring_v[:, :, p % W] = x["k_own"][:, :, p], x["v_own"][:, :, p]
        row = lambda g: None if g is None else g[:, :, t:t + 1]  # noqa: E731
        dec = oracle_sparse_decode(x["q"][:, :, t:t + 1], ring_k, ring_v, x["k_shared"], x["v_shared"],
                                   idx[:, :, t:t + 1], torch.full((B,), t + 1), bs, 3, row(x["gate_sparse"]),
                                   row(x["gate_swa"]), x["sinks"], merge=merge)
        assert rel_err(dec, full[:, :, t:t + 1]) < 1e-14, t


def test_extend_oracles_equal_the_prefill_rows(gen):
    B, Hq, Hkv, T, d, bs = 2, 4, 2, 30, 8, 4
    q, k, v = (torch.randn(B, h, T, d, generator=gen, dtype=F64) for h in (Hq, Hkv, Hkv))
    start, R = torch.tensor([9, 22]), 6
    rows = lambda x: torch.stack([x[b, :, int(s):int(s) + R] for b, s in enumerate(start)])  # noqa: E731
    full, _, full_idx = oracle_full(q, k, v, bs, 12)
    out, _, idx = oracle_full_extend(rows(q), k, v, start, bs, 12)
    assert rel_err(out, rows(full)) < 1e-14 and torch.equal(idx, rows(full_idx))
    sel = random_indices(B, Hkv, T, bs, 2, gen)
    sinks = torch.randn(Hq, generator=gen, dtype=F64)
    sparse = oracle_sparse(q, k, v, k, v, sel, bs, 5, sinks=sinks)
    pos = start.view(-1, 1) + torch.arange(R)
    ext = oracle_sparse_rows(rows(q), k, v, k, v, rows(sel), pos, bs, 5, sinks=sinks)
    assert rel_err(ext, rows(sparse)) < 1e-14


def test_full_oracle_equals_sdpa(gen):
    q, k, v = (torch.randn(2, h, 37, 16, generator=gen, dtype=F64) for h in (8, 2, 2))
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1),
                                                            is_causal=True)
    assert rel_err(oracle_full(q, k, v, 16, 32)[0], sdpa) < 1e-14
