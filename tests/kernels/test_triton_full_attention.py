"""Triton full-attention kernels (forward + selection, backward, decode) against the reference backend.

Runs on CUDA, or on CPU under TRITON_INTERPRET=1 (tiny shapes: the interpreter is slow).
"""

import math
import os

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from hysparse_compile.kernels import reference  # noqa: E402
from hysparse_compile.kernels.triton import full_attention as fa  # noqa: E402
from hysparse_compile.kernels.triton.full_attention import (  # noqa: E402
    full_attention_bwd, full_attention_fwd, full_attention_supports)
from hysparse_compile.kernels.triton.full_attention_decode import full_attention_decode  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def make_qkv(B, Hq, Hkv, T, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, T, d, generator=g).to(DEV, dtype) for h in (Hq, Hkv, Hkv))
    return q, k, v


def assert_close(a, b, dtype):
    err = ((a.float() - b.float()).norm() / b.float().norm()).item()
    assert err < TOL[dtype], f"relative error {err:.2e} >= {TOL[dtype]:.0e}"


def assert_same_selection(idx, ref_idx, scores, Hkv):
    """Equal index sets, except where the group scores of both picks agree to rounding (near ties)."""
    B, Hq, T, nb = scores.shape
    sg = scores.view(B, Hkv, Hq // Hkv, T, nb).amax(2)  # [B, Hkv, T, nb]
    assert ((idx[..., 1:] > idx[..., :-1]) | (idx[..., 1:] == -1)).all(), "indices must ascend, -1 padding last"

    def picked(ix):
        s = torch.gather(sg, -1, ix.long().clamp_min(0))
        return torch.where(ix >= 0, s, torch.zeros_like(s)).sort(-1, descending=True).values

    assert torch.equal(idx >= 0, ref_idx >= 0), "number of selected blocks differs"
    assert torch.allclose(picked(idx), picked(ref_idx), rtol=1e-4, atol=1e-7)
    assert (idx == ref_idx).float().mean() > 0.98


def run_fwd_case(B, Hq, Hkv, T, d, bs, topk, dtype, seed, scale=None):
    q, k, v = make_qkv(B, Hq, Hkv, T, d, dtype, seed)
    scale = scale or 1 / math.sqrt(d)
    out, idx, lse, scores = full_attention_fwd(q, k, v, bs, topk, scale, True)
    r_out, r_idx, r_lse, r_sc = reference.full_attention_fwd(q.float(), k.float(), v.float(), bs, topk, scale, True)
    assert out.dtype == dtype and idx.dtype == torch.int32 and idx.shape == (B, Hkv, T, topk // bs)
    assert_close(out, r_out, dtype)
    assert (lse - r_lse).abs().max() < 1e-4
    assert torch.allclose(scores, r_sc, rtol=1e-3 if dtype != torch.float32 else 1e-5, atol=1e-6)
    assert_same_selection(idx, r_idx, r_sc, Hkv)
    return q, k, v, out, lse


@pytest.mark.parametrize("T", [50, 97])
def test_forward_matches_reference_when_T_is_not_a_block_multiple(T):
    run_fwd_case(2, 4, 1, T, 16, 16, 48, torch.float32, seed=T)


def test_forward_selects_every_block_when_fewer_candidates_than_topk():
    q, k, v = make_qkv(1, 2, 2, 12, 16, torch.float32, 1)  # T < block_size < topk
    _, idx, _, _ = full_attention_fwd(q, k, v, 16, 64, 0.25, False)
    assert idx[..., 0].eq(0).all() and idx[..., 1:].eq(-1).all()


@pytest.mark.parametrize("G", [1, 4, 16])
def test_group_selection_is_exact_across_gqa_groups(G):
    run_fwd_case(1, G, 1, 40, 16, 16, 32, torch.float32, seed=G)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_forward_matches_fp32_reference(dtype):
    run_fwd_case(1, 2, 1, 33, 32, 16, 32, dtype, seed=5, scale=0.3)


def test_gpu_tiling_with_several_blocks_per_tile_matches_reference(monkeypatch):
    if fa.INTERPRET:  # BLOCK_N = 64 holds four 16-key blocks: exercises the sub-block path used on GPUs
        monkeypatch.setattr(fa, "INTERPRET_FWD_CONFIG", {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1})
    run_fwd_case(1, 2, 1, 90, 16, 16, 48, torch.float32, seed=7)


def test_selection_ignores_future_blocks():
    q, k, v = make_qkv(1, 2, 1, 64, 16, torch.float32, 2)
    _, idx, _, _ = full_attention_fwd(q, k, v, 16, 32, 0.25, False)
    t = torch.arange(64, device=DEV).view(1, 1, 64, 1)
    assert ((idx == -1) | (idx * 16 <= t)).all()


def test_rows_whose_probabilities_underflow_still_rank_blocks():
    q, k, v = make_qkv(1, 1, 1, 48, 16, torch.float32, 3)
    k[:, :, 40] *= 0  # make key 40 dominate query 47 so every other block's probability underflows to 0
    q[:, :, 47] = 0
    q[:, :, 47, 0], k[:, :, 40, 0] = 200.0, 200.0
    _, idx, _, _ = full_attention_fwd(q, k, v, 16, 32, 1.0, False)
    assert idx[0, 0, 47].tolist()[1] == 2 and idx[0, 0, 47, 0] in (0, 1)  # block 2 plus a real (underflowed) block


def test_non_contiguous_inputs_match_contiguous():
    q, k, v = make_qkv(1, 2, 1, 40, 16, torch.float32, 4)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # same values, [B, T, H, d] memory
    a = full_attention_fwd(qt, k, v, 16, 32, 0.25, False)
    b = full_attention_fwd(q, k, v, 16, 32, 0.25, False)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_backward_matches_reference_gradients(dtype):
    q, k, v, out, lse = run_fwd_case(2, 4, 2, 37, 16, 16, 32, dtype, seed=6)
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(16)).to(out)
    dq, dk, dv = full_attention_bwd(do, q, k, v, out, lse, 0.25)
    r = reference.full_attention_bwd(do.float(), q.float(), k.float(), v.float(), out.float(), lse, 0.25)
    for got, want in zip((dq, dk, dv), r):
        assert got.dtype == dtype and got.shape == want.shape
        assert_close(got, want, dtype)


def test_decode_equals_prefill_row_at_cache_len():
    B, Hq, Hkv, S, d, bs, topk = 2, 4, 2, 70, 16, 16, 48
    q, kc, vc = make_qkv(B, Hq, Hkv, S, d, torch.float32, 8)
    lens = torch.tensor([70, 29], dtype=torch.int32, device=DEV)
    out, idx = full_attention_decode(q[:, :, :1], kc, vc, lens, bs, topk, 0.25)
    for b in range(B):
        L = int(lens[b])
        qp = q[b:b + 1, :, :L].clone()
        qp[:, :, L - 1] = q[b, :, 0]
        p_out, p_idx, _, _ = full_attention_fwd(qp, kc[b:b + 1, :, :L], vc[b:b + 1, :, :L], bs, topk, 0.25, False)
        assert torch.allclose(out[b, :, 0], p_out[0, :, L - 1], atol=1e-5)
        assert torch.equal(idx[b, :, 0], p_idx[0, :, L - 1])


def test_decode_matches_reference_decode_in_bf16():
    q, kc, vc = make_qkv(2, 4, 1, 50, 32, torch.bfloat16, 9)
    lens = torch.tensor([17, 50], dtype=torch.int32, device=DEV)
    out, idx = full_attention_decode(q[:, :, :1], kc, vc, lens, 16, 32, 0.2)
    r_out, r_idx = reference.full_attention_decode(q[:, :, :1].float(), kc.float(), vc.float(), lens, 16, 32, 0.2)
    assert_close(out, r_out, torch.bfloat16)
    assert torch.equal(idx, r_idx)


def test_supports_names_the_unsupported_value():
    ok = dict(head_dim=128, block_size=64, nsel=16, group=4, dtype=torch.bfloat16)
    assert full_attention_supports("full_attention", **ok) is None
    assert full_attention_supports("full_attention_decode", **ok) is None
    assert "96" in full_attention_supports("full_attention", head_dim=96)
    assert "24" in full_attention_supports("full_attention", block_size=24)
    assert "32" in full_attention_supports("full_attention", group=32)
    assert "float64" in full_attention_supports("full_attention", dtype=torch.float64)
    assert full_attention_supports("sparse_attention") is not None
