"""The sparse layer of every backend (reference, flex, Triton token-major and K/V-block-major) against the float64
oracle over the shared grid (grid.py): prefill output, gradients with respect to every input (q, own K/V, shared
K/V, gates, sinks), and decode from a SWA ring buffer with a different cache length per row."""
from __future__ import annotations

import functools

import pytest
import torch

from grid import (BY_NAME, CASES, FWD_TOL, GRAD_TOL, Case, alternate, dout_like, points, run_as, sparse_decode_inputs,
                  sparse_leaves, wire)
from hysparse_compile import functional as F
from oracle import dense_sparse, max_rel_err, oracle_sparse, oracle_sparse_decode, rel_err

LEAVES = ("q", "k_own", "v_own", "k_full", "v_full", "gate_sparse", "gate_swa", "sinks")
NOT_MERGED = [c for c in CASES if not c.merge]  # merge runs token-major whatever the order (documented)


def _call(case: Case, w: dict, backend: str, save_branches: bool = False):
    return F.sparse_attention(w["q"], w["k_own"], w["v_own"], w["k_shared"], w["v_shared"], w["indices"],
                              block_size=case.block, window=case.window, gate_sparse=w["gate_sparse"],
                              gate_swa=w["gate_swa"], sinks=w["sinks"], merge=case.merge,
                              save_branches=save_branches, backend=backend)


@functools.lru_cache(maxsize=None)
def _oracle(name: str, dtype):
    case = BY_NAME[name]
    w = wire(case, sparse_leaves(case, dtype))
    return oracle_sparse(w["q"], w["k_own"], w["v_own"], w["k_shared"], w["v_shared"], w["indices"], case.block,
                         case.window, w["gate_sparse"], w["gate_swa"], w["sinks"], merge=case.merge)


# Default sample: every case on the reference (one dtype, alternating) and the chunked reference (the other one);
# flex alternating; Triton (interpreted on CPU: slow) on the points below, which between the two loop orders cover
# G = 1/4/8/16, per-channel and per-head gates, kv_sharing none/both, swa off, merge, block 32, bf16 and the
# paper's d = 128, block = 64.
FWD_POINTS = points(["reference", "reference-chunked", "flex", "triton-token"], {
    "reference": alternate, "reference-chunked": lambda i, j: not alternate(i, j), "flex": alternate,
    "triton-token": {("g4_T50_head_kvnone", "bfloat16"), ("g16_T33_Tlt_window_kvboth", "float32"),
                     ("g4_T41_merge", "bfloat16"), ("paper_d128_b64", "float32")}})
FWD_POINTS += points(["triton-block"], {
    "triton-block": {("g1_T45_elem", "bfloat16"), ("g8_T37_noswa_Tlt_topk", "float32"),
                     ("g4_T47_block32", "bfloat16"), ("paper_d128_b64", "bfloat16")}}, cases=NOT_MERGED)


@pytest.mark.parametrize("case,dtype,backend", FWD_POINTS)
def test_sparse_layer_prefill_matches_oracle(case: Case, dtype, backend):
    w = wire(case, sparse_leaves(case, dtype))
    with run_as(backend, case.B * case.Hq * case.T) as name:
        out = _call(case, w, name)
    assert out.dtype == dtype and out.shape == w["q"].shape
    assert rel_err(out, _oracle(case.name, dtype)) < FWD_TOL[dtype]


def test_sparse_layer_prefill_matches_oracle_in_float64_on_the_reference():
    case = BY_NAME["g4_T50_head_kvnone"]
    w = wire(case, sparse_leaves(case, torch.float64))
    with run_as("reference-chunked", case.B * case.Hq * case.T):
        out = _call(case, w, "reference")
    assert rel_err(out, _oracle(case.name, torch.float64)) < 1e-12


BWD_POINTS = points(["reference-chunked", "flex", "triton-token"], {
    "reference-chunked": alternate, "flex": lambda i, j: not alternate(i, j),
    "triton-token": {("g1_T45_elem", "float32"), ("g8_T37_noswa_Tlt_topk", "bfloat16"), ("g4_T41_merge", "float32"),
                     ("paper_d128_b64", "bfloat16")}})
BWD_POINTS += points(["triton-block"], {
    "triton-block": {("g4_T50_head_kvnone", "float32"), ("g16_T33_Tlt_window_kvboth", "bfloat16"),
                     ("paper_d128_b64", "bfloat16")}}, cases=NOT_MERGED)


def _grads(case: Case, leaves: dict, backend: str, dout, save_branches=False):
    """Gradients of <dout, sparse layer> wrt every leaf the ablation reads (name -> tensor)."""
    w = wire(case, leaves)
    used = {k: leaves[k] for k in LEAVES if leaves[k] is not None and any(leaves[k] is x for x in w.values())}
    for x in used.values():
        x.requires_grad_()
    out = _call(case, w, backend, save_branches) if backend != "oracle" else dense_sparse(
        w["q"], w["k_own"], w["v_own"], w["k_shared"], w["v_shared"], w["indices"], case.block, case.window,
        w["gate_sparse"], w["gate_swa"], w["sinks"], merge=case.merge)
    grads = torch.autograd.grad(out, list(used.values()), dout.to(out.dtype), allow_unused=True)
    return {k: torch.zeros_like(x) if g is None else g for (k, x), g in zip(used.items(), grads)}  # unread: 0


@pytest.mark.parametrize("case,dtype,backend", BWD_POINTS)
def test_sparse_layer_gradients_match_oracle(case: Case, dtype, backend):
    """Every input's gradient (q, own and shared K/V, both gates, sinks) against float64 autograd through the dense
    oracle. The oracle's gradient of every input the layer reads is nonzero, so no check is empty; inputs it does
    not read (own K/V without a SWA branch) must get exact zeros. Odd cases keep the branch outputs for the
    backward (save_branches=True), even ones recompute them."""
    leaves = sparse_leaves(case, dtype)
    dout = dout_like(leaves["q"].shape, torch.float64)
    with run_as(backend, case.B * case.Hq * case.T) as name:
        got = _grads(case, leaves, name, dout, save_branches=CASES.index(case) % 2 == 1)
    ref_leaves = {k: None if v is None else v.detach().double() for k, v in sparse_leaves(case, dtype).items()}
    ref_leaves["indices"] = leaves["indices"]
    want = _grads(case, ref_leaves, "oracle", dout)
    assert set(got) == set(want)
    unread = {"k_own", "v_own"} if case.window is None and case.kv_sharing == "sparse_branch" else set()
    for name, w in want.items():
        assert (w.abs().max() > 0) != (name in unread), f"{name}: the oracle gradient is zero, the check is empty"
        assert got[name].dtype == dtype and got[name].shape == w.shape, name
        assert max_rel_err(got[name], w) < GRAD_TOL[dtype], f"{name}: {max_rel_err(got[name], w):.2e}"


def test_sparse_layer_gradients_match_oracle_in_float64_on_the_reference():
    case = BY_NAME["g16_T33_Tlt_window_kvboth"]
    dout = dout_like((case.B, case.Hq, case.T, case.d), torch.float64)
    with run_as("reference-chunked", case.B * case.Hq * case.T):
        got = _grads(case, sparse_leaves(case, torch.float64), "reference", dout)
    want = _grads(case, sparse_leaves(case, torch.float64), "oracle", dout)
    for name in want:
        assert max_rel_err(got[name], want[name]) < 1e-12, name


DECODE_POINTS = points(["reference", "flex", "triton"], {
    "reference": alternate, "flex": lambda i, j: not alternate(i, j),
    "triton": {("g1_T45_elem", "bfloat16"), ("g4_T50_head_kvnone", "float32"), ("g8_T37_noswa_Tlt_topk", "bfloat16"),
               ("g16_T33_Tlt_window_kvboth", "float32"), ("g4_T41_merge", "float32"), ("paper_d128_b64", "float32")}})



@pytest.mark.parametrize("case,dtype,backend", DECODE_POINTS)
def test_sparse_layer_decode_matches_oracle(case: Case, dtype, backend):
    """One new token per row at t = cache_len[b] - 1 (a different length per row): sparse branch over the shared
    cache (slots past t hold garbage), SWA branch from a ring buffer of W > window slots (position p in slot
    p % W; stale slots hold garbage)."""
    q, k_win, v_win, k_sh, v_sh, idx, cache_len, gs, gw, sinks = sparse_decode_inputs(case, dtype)
    with run_as(backend, 1) as name:
        out = F.sparse_attention_decode(q, k_win, v_win, k_sh, v_sh, idx, cache_len, block_size=case.block,
                                        window=case.window, gate_sparse=gs, gate_swa=gw, sinks=sinks,
                                        merge=case.merge, backend=name)
    ref = oracle_sparse_decode(q, k_win, v_win, k_sh, v_sh, idx, cache_len, case.block, case.window, gs, gw,
                               sinks, merge=case.merge)
    assert out.shape == q.shape and out.dtype == dtype
    assert rel_err(out, ref) < FWD_TOL[dtype]
