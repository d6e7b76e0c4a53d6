"""Two op parameters threaded through every backend: logit soft-capping (`softcap`, Gemma 2) on both layers, and
per-head sinks on the full layer (gpt-oss), against the float64 oracle (tests/oracle.py, which writes both from
their definitions): prefill output, block scores and selection, gradients (q, K/V, gates, sinks), decode and
extend (every backend, Triton's extend kernels included). Reference and flex run with forced small query chunks where
they have them; Triton runs interpreted."""
from __future__ import annotations

import pytest
import torch

from grid import (BY_NAME, FWD_TOL, GRAD_TOL, alternate, assert_selection_matches, dout_like, full_qkv, run_as,
                  sparse_decode_inputs, sparse_leaves, stale_tail, wire)
from hysparse_compile import functional as F
from hysparse_compile.runtime import extend
from oracle import (dense_full, dense_sparse, max_rel_err, oracle_full, oracle_full_decode, oracle_full_extend,
                    oracle_sparse, oracle_sparse_decode, oracle_sparse_extend, prefill_positions, random_selection,
                    rel_err)

CAP = 1.5  # small enough that most logits are capped hard (|logit| ~ 1 for these inputs)
OPTIONS = {"softcap": (CAP, False), "sinks": (None, True), "both": (CAP, True)}
SCORE_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-4}
FULL_CASES = ["g1_T45_elem", "g4_T50_head_kvnone", "g16_T33_Tlt_window_kvboth"]
DTYPES = [torch.float32, torch.bfloat16]


def _sinks(case, dtype, use: bool, seed: int = 31):
    return torch.randn(case.Hq, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype) \
        if use else None


def _grid(backends, heavy=("triton",), heavy_points=2):
    """(case, dtype, backend, option) points: cheap backends alternate over cases and dtypes; `heavy` ones
    (interpreted Triton) run one case per option."""
    out = []
    for i, name in enumerate(FULL_CASES):
        for j, dt in enumerate(DTYPES):
            for k, opt in enumerate(OPTIONS):
                for be in backends:
                    keep = (i == k % len(FULL_CASES) and j == k % 2) if be.split("-")[0] in heavy else alternate(i, j + k)
                    if keep:
                        out.append(pytest.param(BY_NAME[name], dt, be, opt,
                                                id=f"{name}-{str(dt)[6:]}-{be}-{opt}"))
    return out


# ---------------------------------------------------------------------------------------------- full layer
@pytest.mark.parametrize("case,dtype,backend,option", _grid(["reference", "reference-chunked", "flex", "triton"]))
def test_full_layer_with_softcap_and_sinks_matches_oracle(case, dtype, backend, option):
    softcap, use_sinks = OPTIONS[option]
    q, k, v = full_qkv(case, dtype)
    sinks = _sinks(case, dtype, use_sinks)
    with run_as(backend, case.B * case.Hq * case.T) as name:
        out, idx, scores = F.full_attention(q, k, v, block_size=case.block, topk=case.topk, backend=name,
                                            return_scores=True, softcap=softcap, sinks=sinks)
    o_ref, s_ref, i_ref = oracle_full(q, k, v, case.block, case.topk, softcap=softcap, sinks=sinks)
    assert rel_err(out, o_ref) < FWD_TOL[dtype]
    assert rel_err(scores, s_ref) < SCORE_TOL[dtype]
    assert_selection_matches(idx, i_ref, s_ref, case.Hkv, prefill_positions(case.B, case.T), case.block)


@pytest.mark.parametrize("case,dtype,backend,option", _grid(["reference-chunked", "flex", "triton"]))
def test_full_layer_gradients_with_softcap_and_sinks_match_oracle(case, dtype, backend, option):
    softcap, use_sinks = OPTIONS[option]
    leaves = [x.requires_grad_() for x in full_qkv(case, dtype)]
    sinks = _sinks(case, dtype, use_sinks)
    if sinks is not None:
        leaves.append(sinks.requires_grad_())
    dout = dout_like(leaves[0].shape, dtype)
    with run_as(backend, case.B * case.Hq * case.T) as name:
        out, _ = F.full_attention(*leaves[:3], block_size=case.block, topk=case.topk, backend=name, softcap=softcap,
                                  sinks=sinks)
        got = torch.autograd.grad(out, leaves, dout)
    ref = [x.detach().double().requires_grad_() for x in leaves]
    want = torch.autograd.grad(dense_full(*ref[:3], softcap=softcap, sinks=ref[3] if use_sinks else None), ref,
                               dout.double())
    for name, g, w in zip(("dq", "dk", "dv", "dsinks"), got, want):
        assert w.abs().max() > 0, name
        assert g.dtype == dtype and g.shape == w.shape, name
        assert max_rel_err(g, w) < GRAD_TOL[dtype], f"{name}: {max_rel_err(g, w):.2e}"


@pytest.mark.parametrize("case,dtype,backend,option", _grid(["reference", "flex", "triton"]))
def test_full_layer_decode_with_softcap_and_sinks_matches_oracle(case, dtype, backend, option):
    softcap, use_sinks = OPTIONS[option]
    q, k, v = full_qkv(case, dtype, seed=5)
    cache_len = case.cache_lens()
    k, v = stale_tail(k, cache_len), stale_tail(v, cache_len, seed=12)
    sinks = _sinks(case, dtype, use_sinks)
    with run_as(backend, 1) as name:
        out, idx = F.full_attention_decode(q[:, :, :1], k, v, cache_len, block_size=case.block, topk=case.topk,
                                           backend=name, softcap=softcap, sinks=sinks)
    o_ref, s_ref, i_ref = oracle_full_decode(q[:, :, :1], k, v, cache_len, case.block, case.topk, softcap=softcap,
                                             sinks=sinks)
    assert rel_err(out, o_ref) < FWD_TOL[dtype]
    assert_selection_matches(idx, i_ref, s_ref, case.Hkv, (cache_len.long() - 1).view(-1, 1), case.block)


def _new_rows(x, start, R):
    return None if x is None else torch.stack([x[b, :, int(s):int(s) + R] for b, s in enumerate(start)])


@pytest.mark.parametrize("case,dtype,backend,option", _grid(["reference-chunked", "flex", "triton"]))
def test_full_layer_extend_with_softcap_and_sinks_matches_oracle(case, dtype, backend, option):
    softcap, use_sinks = OPTIONS[option]
    q_all, k, v = full_qkv(case, dtype, seed=6)
    R, start = case.extend_rows()
    k, v = stale_tail(k, start + R), stale_tail(v, start + R, seed=13)
    q = _new_rows(q_all, start, R)
    sinks = _sinks(case, dtype, use_sinks)
    with run_as(backend, case.B * case.Hq * case.T, rows=2) as name:
        out, idx = extend.full_attention_extend(q, k, v, start, case.block, case.topk, case.d ** -0.5,
                                                softcap=softcap, sinks=sinks, backend=name)
    o_ref, s_ref, i_ref = oracle_full_extend(q, k, v, start, case.block, case.topk, softcap=softcap, sinks=sinks)
    assert rel_err(out, o_ref) < FWD_TOL[dtype]
    assert_selection_matches(idx, i_ref, s_ref, case.Hkv, start.view(-1, 1) + torch.arange(R), case.block)


# ---------------------------------------------------------------------------------------------- sparse layer
SPARSE_CASES = ["g1_T45_elem", "g4_T50_head_kvnone", "g8_T37_noswa_Tlt_topk", "g4_T41_merge"]


def _sparse_points(backends, heavy=("triton",)):
    out = []
    for i, name in enumerate(SPARSE_CASES):
        for j, dt in enumerate(DTYPES):
            for be in backends:
                keep = (j == i % 2) if be.split("-")[0] in heavy else alternate(i, j)
                if keep and not (be == "triton-block" and BY_NAME[name].merge):
                    out.append(pytest.param(BY_NAME[name], dt, be, id=f"{name}-{str(dt)[6:]}-{be}"))
    return out


def _sparse_call(case, w, backend):
    return F.sparse_attention(w["q"], w["k_own"], w["v_own"], w["k_shared"], w["v_shared"], w["indices"],
                              block_size=case.block, window=case.window, gate_sparse=w["gate_sparse"],
                              gate_swa=w["gate_swa"], sinks=w["sinks"], merge=case.merge, backend=backend,
                              softcap=CAP)


@pytest.mark.parametrize("case,dtype,backend",
                         _sparse_points(["reference", "reference-chunked", "flex", "triton-token", "triton-block"]))
def test_sparse_layer_with_softcap_matches_oracle(case, dtype, backend):
    w = wire(case, sparse_leaves(case, dtype))
    with run_as(backend, case.B * case.Hq * case.T) as name:
        out = _sparse_call(case, w, name)
    ref = oracle_sparse(w["q"], w["k_own"], w["v_own"], w["k_shared"], w["v_shared"], w["indices"], case.block,
                        case.window, w["gate_sparse"], w["gate_swa"], w["sinks"], merge=case.merge, softcap=CAP)
    assert rel_err(out, ref) < FWD_TOL[dtype]


LEAVES = ("q", "k_own", "v_own", "k_full", "v_full", "gate_sparse", "gate_swa", "sinks")


@pytest.mark.parametrize("case,dtype,backend",
                         _sparse_points(["reference-chunked", "flex", "triton-token", "triton-block"]))
def test_sparse_layer_gradients_with_softcap_match_oracle(case, dtype, backend):
    x = sparse_leaves(case, dtype)
    leaves = {n: x[n].requires_grad_() for n in LEAVES if x[n] is not None}
    dout = dout_like((case.B, case.Hq, case.T, case.d), dtype)
    with run_as(backend, case.B * case.Hq * case.T) as name:
        got = torch.autograd.grad(_sparse_call(case, wire(case, x), name), list(leaves.values()), dout,
                                  allow_unused=True)
    ref = {n: t.detach().double().requires_grad_() for n, t in leaves.items()}
    xr = {**{n: None for n in LEAVES}, **ref, "indices": x["indices"]}
    w = wire(case, xr)
    out = dense_sparse(w["q"], w["k_own"], w["v_own"], w["k_shared"], w["v_shared"], w["indices"], case.block,
                       case.window, w["gate_sparse"], w["gate_swa"], w["sinks"], merge=case.merge, softcap=CAP)
    want = torch.autograd.grad(out, list(ref.values()), dout.double(), allow_unused=True)
    for name, g, wt in zip(leaves, got, want):
        if wt is None or wt.abs().max() == 0:
            assert g is None or g.abs().max() == 0, name
            continue
        assert max_rel_err(g, wt) < GRAD_TOL[dtype], f"{name}: {max_rel_err(g, wt):.2e}"



@pytest.mark.parametrize("case,dtype,backend", _sparse_points(["reference", "flex", "triton"]))
def test_sparse_layer_decode_with_softcap_matches_oracle(case, dtype, backend):
    q, k_win, v_win, k_sh, v_sh, idx, cache_len, gs, gw, sinks = sparse_decode_inputs(case, dtype)
    with run_as(backend, 1) as name:
        out = F.sparse_attention_decode(q, k_win, v_win, k_sh, v_sh, idx, cache_len, block_size=case.block,
                                        window=case.window, gate_sparse=gs, gate_swa=gw, sinks=sinks,
                                        merge=case.merge, backend=name, softcap=CAP)
    ref = oracle_sparse_decode(q, k_win, v_win, k_sh, v_sh, idx, cache_len, case.block, case.window, gs, gw,
                               sinks, merge=case.merge, softcap=CAP)
    assert rel_err(out, ref) < FWD_TOL[dtype]


@pytest.mark.parametrize("case,dtype,backend", _sparse_points(["reference-chunked", "flex", "triton"]))
def test_sparse_layer_extend_with_softcap_matches_oracle(case, dtype, backend):
    """The SWA keys as a linear cache (position = slot); the ring layout is the runtime's (tests/runtime)."""
    x = sparse_leaves(case, dtype, seed=9)
    R, start = case.extend_rows()
    own = "full" if case.kv_sharing == "both" else "own"
    shared = "own" if case.kv_sharing == "none" else "full"
    k_own, v_own = x[f"k_{own}"], x[f"v_{own}"]
    k_sh, v_sh = stale_tail(x[f"k_{shared}"], start + R), stale_tail(x[f"v_{shared}"], start + R, seed=14)
    idx = random_selection(start.view(-1, 1) + torch.arange(R), case.Hkv, case.block, case.nsel,
                           torch.Generator().manual_seed(5))
    q = _new_rows(x["q"], start, R)
    gs, gw = _new_rows(x["gate_sparse"], start, R), _new_rows(x["gate_swa"], start, R)
    k_win, v_win = stale_tail(k_own, start + R, seed=15), stale_tail(v_own, start + R, seed=16)
    win_pos = torch.arange(case.T).view(1, -1).expand(case.B, -1)
    with run_as(backend, case.B * case.Hq * 2 * case.T, rows=2) as name:
        out = extend.sparse_attention_extend(q, k_sh, v_sh, idx, k_win, v_win, win_pos, start,
                                             block_size=case.block, window=case.window, gate_sparse=gs,
                                             gate_swa=gw, sinks=x["sinks"], scale=case.d ** -0.5, merge=case.merge,
                                             softcap=CAP, backend=name)
    ref = oracle_sparse_extend(q, k_own, v_own, k_sh, v_sh, idx, start, case.block, case.window, gs, gw, x["sinks"],
                               merge=case.merge, softcap=CAP)
    assert rel_err(out, ref) < FWD_TOL[dtype]


def test_options_that_are_off_change_nothing():
    """softcap=None/0 and sinks=None are the op without them, bit for bit (every backend skips them)."""
    case = BY_NAME["g4_T50_head_kvnone"]
    q, k, v = full_qkv(case, torch.float32)
    plain = F.full_attention(q, k, v, block_size=case.block, topk=case.topk)
    for extra in ({"softcap": None}, {"softcap": 0.0}, {"sinks": None}):
        got = F.full_attention(q, k, v, block_size=case.block, topk=case.topk, **extra)
        assert all(torch.equal(a, b) for a, b in zip(got, plain))


def test_bad_softcap_is_refused_naming_the_parameter():
    case = BY_NAME["g1_T45_elem"]
    q, k, v = full_qkv(case, torch.float32)
    for bad in (-1.0, float("inf"), True):
        with pytest.raises(ValueError, match="softcap must be None"):
            F.full_attention(q, k, v, block_size=16, topk=32, softcap=bad)
    with pytest.raises(ValueError, match=r"sinks must be a float tensor of shape \[Hq=2\]"):
        F.full_attention(q, k, v, block_size=16, topk=32, sinks=torch.zeros(3))
