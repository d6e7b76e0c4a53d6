"""`runtime.extend` (several new tokens per row against a non-empty cache: chunked prefill, speculative
verification) against the float64 oracle over the shared grid (tests/kernels/grid.py): a different start position
per row, cache slots past the new tokens holding garbage, the SWA keys laid out as the runtime lays them out (ring
slots, then the new tokens) or as a linear cache, with small query chunks forced so the chunk offsets run."""
from __future__ import annotations

import pytest
import torch

from grid import ring_then_new, CASES, DTYPES, FWD_TOL, Case, alternate, dtype_id, full_qkv, point, run_as, sparse_leaves, stale_tail
from hysparse_compile.runtime import extend
from oracle import oracle_full_extend, oracle_sparse_extend, random_selection, rel_err


def _points(variants):
    return [point(case, dt, variant, sample=alternate(i, j + k), id=f"{case.name}-{dtype_id(dt)}-{variant}")
            for i, case in enumerate(CASES) for j, dt in enumerate(DTYPES) for k, variant in enumerate(variants)]


def _new_rows(x: torch.Tensor, start: torch.Tensor, R: int) -> torch.Tensor:
    """[B, H, S, e] -> rows start[b] .. start[b] + R - 1 of each batch: [B, H, R, e]."""
    return torch.stack([x[b, :, int(s):int(s) + R] for b, s in enumerate(start)])


@pytest.mark.parametrize("case,dtype,chunked", _points([True, False]))
def test_full_layer_extend_matches_oracle(case: Case, dtype, chunked):
    q_all, k, v = full_qkv(case, dtype, seed=6)
    R, start = case.extend_rows()
    k, v = stale_tail(k, start + R), stale_tail(v, start + R, seed=13)
    q = _new_rows(q_all, start, R)
    with run_as("reference-chunked" if chunked else "reference", case.B * case.Hq * case.T, rows=2):
        out, idx = extend.full_attention_extend(q, k, v, start, case.block, case.topk, case.d ** -0.5)
    o_ref, _, i_ref = oracle_full_extend(q, k, v, start, case.block, case.topk)
    assert out.dtype == dtype and out.shape == q.shape
    assert rel_err(out, o_ref) < FWD_TOL[dtype]
    assert torch.equal(idx.long(), i_ref)


@pytest.mark.parametrize("case,dtype,layout", _points(["ring", "linear"]))
def test_sparse_layer_extend_matches_oracle(case: Case, dtype, layout):
    x = sparse_leaves(case, dtype, seed=9)
    R, start = case.extend_rows()
    own = {"sparse_branch": "own", "none": "own", "both": "full"}[case.kv_sharing]
    k_own, v_own = x[f"k_{own}"], x[f"v_{own}"]
    shared = "own" if case.kv_sharing == "none" else "full"
    k_sh, v_sh = stale_tail(x[f"k_{shared}"], start + R), stale_tail(x[f"v_{shared}"], start + R, seed=14)
    pos = start.view(-1, 1) + torch.arange(R).view(1, -1)
    idx = random_selection(pos, case.Hkv, case.block, case.nsel, torch.Generator().manual_seed(5))
    q = _new_rows(x["q"], start, R)
    gs, gw = (None if g is None else _new_rows(g, start, R) for g in (x["gate_sparse"], x["gate_swa"]))
    W = (case.window or 4) + 2
    if layout == "ring":
        k_win, win_pos = ring_then_new(k_own, start, R, W)
        v_win, _ = ring_then_new(v_own, start, R, W)
    else:
        k_win, v_win = stale_tail(k_own, start + R, seed=15), stale_tail(v_own, start + R, seed=16)
        win_pos = torch.arange(case.T).view(1, -1).expand(case.B, -1)
    with run_as("reference-chunked", case.B * case.Hq * (case.T + k_win.shape[2]), rows=2):
        out = extend.sparse_attention_extend(q, k_sh, v_sh, idx, k_win, v_win, win_pos, start,
                                             block_size=case.block, window=case.window, gate_sparse=gs,
                                             gate_swa=gw, sinks=x["sinks"], scale=case.d ** -0.5, merge=case.merge)
    ref = oracle_sparse_extend(q, k_own, v_own, k_sh, v_sh, idx, start, case.block, case.window, gs, gw, x["sinks"],
                               merge=case.merge)
    assert out.dtype == dtype and out.shape == q.shape
    assert rel_err(out, ref) < FWD_TOL[dtype]
