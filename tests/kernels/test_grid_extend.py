"""The Triton extend kernels (R new tokens per row against a filled cache: chunked prefill, speculative verification)
against the float64 oracle over the shared grid (grid.py), interpreted on CPU: the full layer's output and selection,
and the sparse layer's output with its SWA keys laid out as the runtime lays them out (ring slots, then the new
tokens; empty slots hold garbage at position -1) or as a linear cache. Each case runs with three row layouts: R = 5
at a different unaligned start per row, R = 1, and R = 21 (more than a 16-key block, odd) from start 0 in row 0.
Cache slots past each row's new tokens hold garbage. Softcap and sinks: test_softcap_sinks.py. The reference and
flex extend paths: tests/runtime/test_extend_oracle.py, test_softcap_sinks.py. Where CUDA is available the kernels run
compiled on it (the inputs are moved there; the oracle runs on the CPU).
"""
from __future__ import annotations

import pytest
import torch

from grid import (ring_then_new, BY_NAME, CASES, DEV, FWD_TOL, HAS_TRITON, Case, assert_selection_matches, dtype_id, full_qkv,
                  point, run_as, sparse_leaves, stale_tail)
from hysparse_compile.runtime import extend
from oracle import oracle_full_extend, oracle_sparse_extend, random_selection, rel_err

ROWS = ("R5", "R1", "R21")


@pytest.fixture(autouse=True)
def _triton_extend_on_a_gpu(monkeypatch):
    """On a GPU the Triton extend kernels run only when asked for until checked there: these tests are the check."""
    monkeypatch.setenv("HYSPARSE_TRITON_EXTEND", "1")


def extend_rows(case: Case, rows: str) -> tuple[int, torch.Tensor]:
    """(R, start int64 [B]) of a row layout; start[b] + R <= T."""
    if rows == "R5":
        return case.extend_rows()
    if rows == "R1":
        return 1, torch.tensor([case.T - 1 - 9 * (case.B - 1 - b) for b in range(case.B)], dtype=torch.int64)
    R = 21
    return R, torch.tensor([0] + [case.T - R - 3 * b for b in range(1, case.B)], dtype=torch.int64)


def on_dev(*xs):
    """The tensors on the device the kernels run on (None stays None)."""
    return tuple(None if x is None else x.to(DEV) for x in xs)


def new_rows(x, start: torch.Tensor, R: int):
    """[B, H, S, e] -> rows start[b] .. start[b] + R - 1 of each batch: [B, H, R, e] (None stays None)."""
    return None if x is None else torch.stack([x[b, :, int(s):int(s) + R] for b, s in enumerate(start)])


# Default sample (interpreted Triton is slow): G = 1/4/8/16, float32 and bfloat16, each row layout, block 32, the
# paper's d = 128 / block 64, kv_sharing none/both, swa off, merge, both SWA layouts; the rest runs with --full.
FULL_SAMPLE = {("g1_T45_elem", "bfloat16", "R5"), ("g4_T50_head_kvnone", "float32", "R21"),
               ("g8_T37_noswa_Tlt_topk", "bfloat16", "R1"), ("g16_T33_Tlt_window_kvboth", "float32", "R21"),
               ("g4_T47_block32", "float32", "R5"), ("paper_d128_b64", "bfloat16", "R1")}
SPARSE_SAMPLE = {("g1_T45_elem", "float32", "R21", "ring"), ("g4_T50_head_kvnone", "bfloat16", "R5", "linear"),
                 ("g8_T37_noswa_Tlt_topk", "bfloat16", "R1", "ring"),
                 ("g16_T33_Tlt_window_kvboth", "float32", "R5", "ring"), ("g4_T41_merge", "bfloat16", "R21", "linear"),
                 ("g1_T30_merge_nosink_Tlt_topk", "float32", "R5", "linear"),
                 ("g4_T47_block32", "bfloat16", "R21", "ring"), ("paper_d128_b64", "float32", "R1", "linear")}
DTYPES = [torch.float32, torch.bfloat16]
TF32_TOL = 5e-3  # the sparse kernels' tl.dot rounds float32 to TF32 on GPUs (the interpreter multiplies in fp32)


def _full_points():
    return [point(c, dt, rows, sample=(c.name, dtype_id(dt), rows) in FULL_SAMPLE,
                  id=f"{c.name}-{dtype_id(dt)}-{rows}") for c in CASES for dt in DTYPES for rows in ROWS]


def _sparse_points():
    return [point(c, dt, rows, layout, sample=(c.name, dtype_id(dt), rows, layout) in SPARSE_SAMPLE,
                  id=f"{c.name}-{dtype_id(dt)}-{rows}-{layout}")
            for c in CASES for dt in DTYPES for rows in ROWS for layout in ("ring", "linear")
            if not (c.merge and layout == "ring")]  # merge reads the window from the shared cache


@pytest.mark.parametrize("case,dtype,rows", _full_points())
def test_triton_full_layer_extend_matches_oracle(case: Case, dtype, rows):
    q_all, k, v = full_qkv(case, dtype, seed=6)
    R, start = extend_rows(case, rows)
    k, v = stale_tail(k, start + R), stale_tail(v, start + R, seed=13)
    q = new_rows(q_all, start, R)
    with run_as("triton", 1) as name:
        out, idx = extend.full_attention_extend(*on_dev(q, k, v, start), case.block, case.topk, case.d ** -0.5,
                                                backend=name)
    out, idx = out.cpu(), idx.cpu()
    o_ref, s_ref, i_ref = oracle_full_extend(q, k, v, start, case.block, case.topk)
    assert out.dtype == dtype and out.shape == q.shape
    assert rel_err(out, o_ref) < FWD_TOL[dtype]
    assert_selection_matches(idx, i_ref, s_ref, case.Hkv, start.view(-1, 1) + torch.arange(R), case.block)


@pytest.mark.parametrize("case,dtype,rows,layout", _sparse_points())
def test_triton_sparse_layer_extend_matches_oracle(case: Case, dtype, rows, layout):
    x = sparse_leaves(case, dtype, seed=9)
    R, start = extend_rows(case, rows)
    own = {"sparse_branch": "own", "none": "own", "both": "full"}[case.kv_sharing]
    shared = "own" if case.kv_sharing == "none" else "full"
    k_own, v_own = x[f"k_{own}"], x[f"v_{own}"]
    k_sh, v_sh = stale_tail(x[f"k_{shared}"], start + R), stale_tail(x[f"v_{shared}"], start + R, seed=14)
    idx = random_selection(start.view(-1, 1) + torch.arange(R), case.Hkv, case.block, case.nsel,
                           torch.Generator().manual_seed(5))
    q, gs, gw = (new_rows(x[n], start, R) for n in ("q", "gate_sparse", "gate_swa"))
    if layout == "ring":
        W = (case.window or 4) + 2
        (k_win, win_pos), (v_win, _) = ring_then_new(k_own, start, R, W), ring_then_new(v_own, start, R, W)
    else:
        k_win, v_win = stale_tail(k_own, start + R, seed=15), stale_tail(v_own, start + R, seed=16)
        win_pos = torch.arange(case.T).view(1, -1).expand(case.B, -1)
    with run_as("triton", 1) as name:
        gs_d, gw_d, sinks_d = on_dev(gs, gw, x["sinks"])
        out = extend.sparse_attention_extend(*on_dev(q, k_sh, v_sh, idx, k_win, v_win, win_pos, start),
                                             block_size=case.block, window=case.window, gate_sparse=gs_d,
                                             gate_swa=gw_d, sinks=sinks_d, scale=case.d ** -0.5, merge=case.merge,
                                             backend=name).cpu()
    ref = oracle_sparse_extend(q, k_own, v_own, k_sh, v_sh, idx, start, case.block, case.window, gs, gw, x["sinks"],
                               merge=case.merge)
    assert out.dtype == dtype and out.shape == q.shape
    assert rel_err(out, ref) < (TF32_TOL if DEV == "cuda" and dtype == torch.float32 else FWD_TOL[dtype])


@pytest.mark.skipif(not HAS_TRITON, reason="triton needs CUDA or TRITON_INTERPRET=1")
def test_triton_full_extend_with_gpu_tiling_matches_oracle(monkeypatch):
    """BLOCK_N = 32 holds two 16-key blocks (the sub-block path GPUs run) and BLOCK_M = 64 > R: query tiles start at
    positions that are not multiples of BLOCK_N."""
    from hysparse_compile.kernels.triton import full_attention as fa

    if fa.INTERPRET:
        monkeypatch.setattr(fa, "INTERPRET_FWD_CONFIG", {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4,
                                                         "num_stages": 1})
    case = BY_NAME["g4_T50_head_kvnone"]
    q_all, k, v = full_qkv(case, torch.float32, seed=6)
    R, start = 23, torch.tensor([5, 27])
    q = new_rows(q_all, start, R)
    k, v = stale_tail(k, start + R), stale_tail(v, start + R, seed=13)
    with run_as("triton", 1) as name:
        out, idx = extend.full_attention_extend(*on_dev(q, k, v, start), case.block, case.topk, case.d ** -0.5,
                                                backend=name)
    out, idx = out.cpu(), idx.cpu()
    o_ref, s_ref, i_ref = oracle_full_extend(q, k, v, start, case.block, case.topk)
    assert rel_err(out, o_ref) < FWD_TOL[torch.float32]
    assert_selection_matches(idx, i_ref, s_ref, case.Hkv, start.view(-1, 1) + torch.arange(R), case.block)


@pytest.mark.skipif(not HAS_TRITON, reason="triton needs CUDA or TRITON_INTERPRET=1")
def test_window_slots_invert_the_position_table():
    """Each position start[b] - window + 1 .. start[b] + R - 1 maps to the slot holding it (the last one if several
    do), -1 where none does; empty slots (-1) and positions outside that span are ignored."""
    from hysparse_compile.kernels.triton.sparse_attention_extend import launch_window_slots

    win_pos = torch.tensor([[7, -1, 3, 9, 12, 4, 9], [0, 1, 2, 3, -1, -1, 40]])
    start, window, R = torch.tensor([9, 2], dtype=torch.int32), 4, 3
    got = launch_window_slots(*on_dev(win_pos, start), window, R)
    want = torch.full((2, window + R - 1), -1, dtype=torch.int32)
    for b in range(2):
        base = int(start[b]) - window + 1
        for slot, p in enumerate(win_pos[b].tolist()):
            if p >= 0 and 0 <= p - base < window + R - 1:
                want[b, p - base] = slot
    assert want[0].tolist() == [-1, 0, -1, 6, -1, -1] and want[1].tolist() == [-1, 0, 1, 2, 3, -1]
    assert torch.equal(got.cpu(), want)


def test_triton_supports_extend_and_names_what_it_refuses():
    from hysparse_compile.kernels import backends

    meta = dict(device="cpu", dtype=torch.bfloat16, head_dim=64, group=4, block_size=64, nsel=16)
    if HAS_TRITON:
        for op in ("full_attention_extend", "sparse_attention_extend"):
            assert backends.unsupported_reason("triton", op, **meta) is None, op
            assert backends.for_op("triton", op, **meta) == "triton"
    for op in ("full_attention_extend", "sparse_attention_extend"):
        why = backends.load("triton").supports(op, **{**meta, "device": "cuda", "head_dim": 96})
        assert why is not None and "96" in why and op in why


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not importable")
@pytest.mark.parametrize("op", ["full_attention_extend", "sparse_attention_extend"])
def test_on_a_gpu_auto_runs_extend_on_the_triton_kernels(op):
    # checked on an H100 on 2026-12-05 (docs/benchmarks.md, "Extend"): extend takes the auto rule of every op
    from hysparse_compile.kernels import backends

    meta = dict(device="cuda", dtype=torch.bfloat16, head_dim=64, block_size=64)
    assert backends.resolve("auto", op, **meta).NAME == "triton"
    assert backends.for_op("triton", op, **meta) == "triton"
    assert backends.resolve("auto", op, **{**meta, "dtype": torch.float32}).NAME == "reference"
