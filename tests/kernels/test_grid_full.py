"""The full-attention layer of every backend (reference, flex, Triton) against the float64 oracle over the shared
grid (grid.py): output, block scores and selection in prefill, gradients, and decode with a different cache length
per row. Reference and flex run with forced small query chunks too, so their chunk offsets are exercised."""
from __future__ import annotations

import functools

import pytest
import torch

from grid import (BY_NAME, FWD_TOL, GRAD_TOL, Case, alternate, assert_selection_matches, dout_like, full_qkv, points,
                  run_as, stale_tail)
from hysparse_compile import functional as F
from oracle import dense_full, max_rel_err, oracle_full, oracle_full_decode, prefill_positions, rel_err

SCORE_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-4}


@functools.lru_cache(maxsize=None)
def _oracle(name: str, dtype):
    case = BY_NAME[name]
    return oracle_full(*full_qkv(case, dtype), case.block, case.topk)


# Default sample: every case on the reference (one dtype, alternating) and the chunked reference (the other one);
# flex alternating; Triton (interpreted on CPU: slow) on the points below, which cover G = 1/4/8/16, bf16, block 32
# and the paper's d = 128, block = 64.
FWD_POINTS = points(["reference", "reference-chunked", "flex", "triton"], {
    "reference": alternate, "reference-chunked": lambda i, j: not alternate(i, j), "flex": alternate,
    "triton": {("g4_T50_head_kvnone", "bfloat16"), ("g16_T33_Tlt_window_kvboth", "float32"),
               ("g8_T37_noswa_Tlt_topk", "float32"), ("g1_T45_elem", "bfloat16"), ("paper_d128_b64", "float32")}})


@pytest.mark.parametrize("case,dtype,backend", FWD_POINTS)
def test_full_layer_prefill_matches_oracle(case: Case, dtype, backend):
    q, k, v = full_qkv(case, dtype)
    with run_as(backend, case.B * case.Hq * case.T) as name:
        out, idx, scores = F.full_attention(q, k, v, block_size=case.block, topk=case.topk, backend=name,
                                            return_scores=True)
    o_ref, s_ref, i_ref = _oracle(case.name, dtype)
    assert out.dtype == dtype and out.shape == q.shape
    assert rel_err(out, o_ref) < FWD_TOL[dtype]
    assert rel_err(scores, s_ref) < SCORE_TOL[dtype]
    assert_selection_matches(idx, i_ref, s_ref, case.Hkv, prefill_positions(case.B, case.T), case.block)


def test_full_layer_prefill_matches_oracle_in_float64_on_the_reference():
    case = BY_NAME["g4_T50_head_kvnone"]
    q, k, v = full_qkv(case, torch.float64)
    with run_as("reference-chunked", case.B * case.Hq * case.T):
        out, idx, scores = F.full_attention(q, k, v, block_size=case.block, topk=case.topk, return_scores=True)
    o_ref, s_ref, i_ref = oracle_full(q, k, v, case.block, case.topk)
    assert rel_err(out, o_ref) < 1e-12 and torch.equal(idx.long(), i_ref)
    assert scores.dtype == torch.float32 and rel_err(scores, s_ref) < 1e-7  # scores are float32 (docs/design.md)


BWD_POINTS = points(["reference-chunked", "flex", "triton"], {
    "reference-chunked": alternate, "flex": lambda i, j: not alternate(i, j),
    "triton": {("g1_T45_elem", "float32"), ("g16_T33_Tlt_window_kvboth", "bfloat16"), ("paper_d128_b64", "bfloat16")}})


@pytest.mark.parametrize("case,dtype,backend", BWD_POINTS)
def test_full_layer_gradients_match_oracle(case: Case, dtype, backend):
    leaves = [x.requires_grad_() for x in full_qkv(case, dtype)]
    dout = dout_like(leaves[0].shape, dtype)
    with run_as(backend, case.B * case.Hq * case.T) as name:
        out, _ = F.full_attention(*leaves, block_size=case.block, topk=case.topk, backend=name)
        got = torch.autograd.grad(out, leaves, dout)
    ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
    want = torch.autograd.grad(dense_full(*ref_leaves), ref_leaves, dout.double())
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert w.abs().max() > 0, f"{name}: the oracle gradient is zero, the check would be empty"
        assert g.dtype == dtype and g.shape == w.shape, name
        assert max_rel_err(g, w) < GRAD_TOL[dtype], f"{name}: {max_rel_err(g, w):.2e}"


def test_full_layer_gradients_match_oracle_in_float64_on_the_reference():
    case = BY_NAME["g16_T33_Tlt_window_kvboth"]
    leaves = [x.requires_grad_() for x in full_qkv(case, torch.float64)]
    dout = dout_like(leaves[0].shape, torch.float64)
    with run_as("reference-chunked", case.B * case.Hq * case.T):
        got = torch.autograd.grad(F.full_attention(*leaves, block_size=16, topk=case.topk)[0], leaves, dout)
    want = torch.autograd.grad(dense_full(*leaves), leaves, dout)
    for g, w in zip(got, want):
        assert max_rel_err(g, w) < 1e-12


DECODE_POINTS = points(["reference", "flex", "triton"], {
    "reference": alternate, "flex": lambda i, j: not alternate(i, j),
    "triton": {("g1_T45_elem", "float32"), ("g4_T50_head_kvnone", "bfloat16"), ("g16_T33_Tlt_window_kvboth", "float32"),
               ("paper_d128_b64", "bfloat16")}})


@pytest.mark.parametrize("case,dtype,backend", DECODE_POINTS)
def test_full_layer_decode_matches_oracle(case: Case, dtype, backend):
    """One new token per row at cache_len[b] - 1 (a different length per row); cache slots past it hold garbage."""
    q, k, v = full_qkv(case, dtype, seed=5)
    cache_len = case.cache_lens()
    k, v = stale_tail(k, cache_len), stale_tail(v, cache_len, seed=12)
    q_new = q[:, :, :1]
    with run_as(backend, 1) as name:
        out, idx = F.full_attention_decode(q_new, k, v, cache_len, block_size=case.block, topk=case.topk,
                                           backend=name)
    o_ref, s_ref, i_ref = oracle_full_decode(q_new, k, v, cache_len, case.block, case.topk)
    assert out.shape == q_new.shape and out.dtype == dtype
    assert rel_err(out, o_ref) < FWD_TOL[dtype]
    assert_selection_matches(idx, i_ref, s_ref, case.Hkv, (cache_len.long() - 1).view(-1, 1), case.block)


@pytest.mark.parametrize("backend", ["reference", "flex", "triton"])
def test_equal_block_scores_select_the_lower_blocks(gen, backend):
    """Every key block holds the same keys, so all complete blocks tie: prefill, decode and extend keep the lowest."""
    B, Hq, Hkv, T, d, bs, nsel = 1, 4, 2, 64, 16, 16, 2
    q = torch.randn(B, Hq, T, d, generator=gen)
    k = torch.randn(B, Hkv, bs, d, generator=gen).repeat(1, 1, T // bs, 1)
    v = torch.randn(B, Hkv, T, d, generator=gen)
    with run_as(backend, B * Hq * T) as name:
        _, idx = F.full_attention(q, k, v, block_size=bs, topk=nsel * bs, backend=name)
        _, idx_dec = F.full_attention_decode(q[:, :, -1:], k, v, torch.tensor([T], dtype=torch.int32),
                                             block_size=bs, topk=nsel * bs, backend=name)
        _, idx_ext = F.full_attention_extend(q[:, :, T - 19:], k, v, torch.tensor([T - 19]), block_size=bs,
                                             topk=nsel * bs, backend=name)
    _, _, i_ref = oracle_full(q, k, v, bs, nsel * bs)
    assert i_ref[0, :, T - 1].tolist() == [[0, 1]] * Hkv  # the oracle's rule, stated
    assert torch.equal(idx[:, :, T - 1].long(), i_ref[:, :, T - 1])
    assert torch.equal(idx_dec[:, :, 0].long(), i_ref[:, :, T - 1])
    assert torch.equal(idx_ext.long(), i_ref[:, :, T - 19:])


def _heads_that_disagree():
    """Two query heads of one KV group, two key blocks of 16, the token at position 31. Head 0's largest logit is in
    block 0 (10 vs 9) but its softmax is spread (p 0.73 vs 0.27); head 1 has small logits but puts p 0.83 on block
    1. Group max of probabilities (SPEC §2.1): block 1 wins (0.83 > 0.73); a group max of raw logits would pick
    block 0 (10 > 9)."""
    d, T = 16, 32
    k = torch.zeros(1, 1, T, d)
    k[0, 0, 3, 0] = 10.0
    k[0, 0, 20, 0], k[0, 0, 20, 1] = 9.0, 5.0
    q = torch.zeros(1, 2, T, d)
    q[0, 0, :, 0] = 1.0
    q[0, 1, :, 1] = 1.0
    v = torch.randn(1, 1, T, d, generator=torch.Generator().manual_seed(2))
    return q, k, v


@pytest.mark.parametrize("backend", ["reference", "flex", "triton"])
def test_group_selection_ranks_probabilities_not_logits(backend):
    q, k, v = _heads_that_disagree()
    _, _, i_ref = oracle_full(q, k, v, 16, 16, scale=1.0)
    assert i_ref[0, 0, 31].tolist() == [1]
    with run_as(backend, 2 * 32) as name:
        _, idx = F.full_attention(q, k, v, block_size=16, topk=16, scale=1.0, backend=name)
        _, idx_dec = F.full_attention_decode(q[:, :, -1:], k, v, torch.tensor([32], dtype=torch.int32),
                                             block_size=16, topk=16, scale=1.0, backend=name)
        _, idx_ext = F.full_attention_extend(q[:, :, 29:], k, v, torch.tensor([29]), block_size=16, topk=16,
                                             scale=1.0, backend=name)
    assert idx[0, 0, 31].tolist() == [1] and idx_dec[0, 0, 0].tolist() == [1] and idx_ext[0, 0, 2].tolist() == [1]
