"""Triton sparse-layer kernels (forward, backward, decode) against the reference backend.

Runs on CUDA, or on CPU under TRITON_INTERPRET=1 (tiny shapes: the interpreter is slow). Cases here use float32
and float16; bf16 runs in the oracle grid (test_grid_sparse.py), where tests/conftest.py widens the interpreter's
bf16 `tl.dot` operands (the interpreter multiplies their bit patterns otherwise, triton-lang/triton#11584).
"""

import os

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from oracle import random_indices  # noqa: E402

from hysparse_compile.kernels import reference  # noqa: E402
from hysparse_compile.kernels.triton.block_union import (  # noqa: E402
    choose_tokens_per_tile, tile_block_union, tile_block_union_torch)
from hysparse_compile.kernels.triton.sparse_attention import (  # noqa: E402
    sparse_attention_fwd, sparse_attention_supports)
from hysparse_compile.kernels.triton.sparse_attention_bwd import inverse_union, sparse_attention_bwd  # noqa: E402
from hysparse_compile.kernels.triton.sparse_attention_decode import sparse_attention_decode  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-5, torch.float16: 3e-3}


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def make_case(gen, B=1, Hq=4, Hkv=1, T=45, d=32, bs=16, nsel=2, gates=None, sinks=True, share=False,
              dtype=torch.float32):
    """Random inputs of one sparse layer; gates None | 'head' ([B,Hq,T,1]) | 'channel' ([B,Hq,T,d], strided)."""
    r = lambda *s: torch.randn(*s, generator=gen).to(DEV, dtype)  # noqa: E731
    q = r(B, Hq, T, d)
    k_own, v_own, k_sh, v_sh = (r(B, Hkv, T, d) for _ in range(4))
    if share:
        k_own, v_own = k_sh, v_sh
    idx = random_indices(B, Hkv, T, bs, nsel, gen).to(DEV)
    gs = gw = None
    if gates == "head":
        gs, gw = (torch.rand(B, Hq, T, 1, generator=gen).to(DEV, dtype) for _ in range(2))
    elif gates == "channel":  # non-contiguous, as a slice of a [B, T, Hq, 2d] projection would be
        both = torch.rand(B, T, Hq, 2 * d, generator=gen).to(DEV, dtype)
        gs, gw = both[..., :d].transpose(1, 2), both[..., d:].transpose(1, 2)
    sk = torch.randn(Hq, generator=gen).to(DEV) if sinks else None
    return dict(q=q, k_own=k_own, v_own=v_own, k_shared=k_sh, v_shared=v_sh, indices=idx, gate_sparse=gs,
                gate_swa=gw, sinks=sk)


def fwd_both(case, bs, window, merge=False, save=True):
    args = (*case.values(), bs, window, case["q"].shape[-1] ** -0.5, merge)
    ref = reference.sparse_attention_fwd(*args, True)
    got = sparse_attention_fwd(*args, save)
    return got, ref


@pytest.mark.parametrize("B,Hq,Hkv,T,gates,sinks,window", [
    (2, 2, 2, 45, None, True, 20),  # G = 1, batch 2, T not a multiple of the block
    (1, 8, 2, 37, "head", False, 64),  # G = 4, T < window
    (1, 16, 1, 30, "channel", True, 7),  # G = 16, strided per-channel gates, T < topk
])
def test_forward_matches_reference(gen, B, Hq, Hkv, T, gates, sinks, window):
    case = make_case(gen, B=B, Hq=Hq, Hkv=Hkv, T=T, gates=gates, sinks=sinks)
    (out, lse, br), (r_out, r_lse, r_br) = fwd_both(case, 16, window)
    assert rel(out, r_out) < TOL[torch.float32]
    assert torch.equal(torch.isinf(lse), torch.isinf(r_lse))
    assert (lse - r_lse).nan_to_num(0.0).abs().max() < 1e-4
    assert rel(br, r_br) < TOL[torch.float32], "saved branch outputs must be the ungated branches"


def test_forward_float16_with_full_layer_selection(gen):
    """Indices produced by the reference full layer (not random) and half precision inputs."""
    case = make_case(gen, Hq=8, Hkv=2, T=70, gates="channel", dtype=torch.float16)
    _, case["indices"], _, _ = reference.full_attention_fwd(case["q"].float(), case["k_shared"].float(),
                                                            case["v_shared"].float(), 16, 32, 32 ** -0.5, False)
    (out, _, _), (r_out, _, _) = fwd_both(case, 16, 24)
    assert out.dtype == torch.float16 and rel(out, r_out) < TOL[torch.float16]


def test_merge_is_one_softmax_over_selected_and_window(gen):
    case = make_case(gen, Hq=8, Hkv=2, T=50, share=True)
    (out, lse, _), (r_out, r_lse, _) = fwd_both(case, 16, 20, merge=True)
    assert rel(out, r_out) < TOL[torch.float32]
    assert torch.isinf(lse[..., 1]).all(), "merge has no separate SWA branch"
    assert (lse[..., 0] - r_lse[..., 0]).abs().max() < 1e-4


def test_window_zero_drops_swa_branch(gen):
    case = make_case(gen, Hq=4, Hkv=2, T=40, gates="head")
    (out, lse, _), (r_out, _, _) = fwd_both(case, 16, 0)
    assert rel(out, r_out) < TOL[torch.float32]
    assert torch.isinf(lse[..., 1]).all() and torch.isfinite(lse[..., 0]).all()


def bwd_both(case, bs, window, merge=False, save=True):
    scale = case["q"].shape[-1] ** -0.5
    out, lse, br = sparse_attention_fwd(*case.values(), bs, window, scale, merge, save)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out)
    got = sparse_attention_bwd(dout, *case.values(), out, lse, br, bs, window, scale, merge)
    ref = reference.sparse_attention_bwd(dout, *case.values(), out, lse, br, bs, window, scale, merge)
    return got, ref


NAMES = ["dq", "dk_own", "dv_own", "dk_shared", "dv_shared", "dgate_sparse", "dgate_swa", "dsinks"]


def assert_grads_match(got, ref, tol=1e-4):
    """Every gradient of `sparse_attention_bwd` present in both or neither, same shape and dtype, within tol."""
    for name, g, r in zip(NAMES, got, ref):
        assert (g is None) == (r is None), name
        if g is not None:
            assert g.shape == r.shape and g.dtype == r.dtype, name
            assert rel(g, r) < tol or (r.abs().max() == 0 and g.abs().max() == 0), f"{name}: {rel(g, r):.2e}"


@pytest.mark.parametrize("B,Hq,Hkv,T,gates,sinks,window,save", [
    (1, 8, 2, 45, "channel", True, 20, False),  # G = 4, per-channel gates, sinks; branches recomputed (the default)
    (1, 16, 1, 33, "head", False, 50, True),  # G = 16, per-head gates, T < window; saved branches
    (2, 2, 2, 40, None, True, 0, True),  # G = 1, batch 2, no SWA branch
])
def test_gradients_match_reference(gen, B, Hq, Hkv, T, gates, sinks, window, save):
    case = make_case(gen, B=B, Hq=Hq, Hkv=Hkv, T=T, gates=gates, sinks=sinks)
    got, ref = bwd_both(case, 16, window, save=save)
    assert_grads_match(got, ref)


@pytest.mark.parametrize("B,Hq,Hkv,T,gates,sinks,window,knobs", [
    (2, 8, 2, 45, "channel", True, 20, dict(tok=2, chunk=4)),  # G = 4, batch 2; busy blocks split over programs
    (1, 16, 1, 40, "head", False, 0, None),  # G = 16, no SWA branch, default knobs
])
def test_block_major_gradients_match_reference(gen, B, Hq, Hkv, T, gates, sinks, window, knobs):
    """order='block' (the default from BWD_AUTO_MIN_T tokens on): K/V-block-major sparse branch, dq by atomics."""
    case = make_case(gen, B=B, Hq=Hq, Hkv=Hkv, T=T, gates=gates, sinks=sinks, nsel=3)
    scale = case["q"].shape[-1] ** -0.5
    out, lse, br = sparse_attention_fwd(*case.values(), 16, window, scale, False, False)
    dout = torch.randn(out.shape, generator=gen).to(out)
    got = sparse_attention_bwd(dout, *case.values(), out, lse, br, 16, window, scale, False, order="block",
                               block_major=knobs)
    ref = reference.sparse_attention_bwd(dout, *case.values(), out, lse, br, 16, window, scale, False)
    assert_grads_match(got, ref)


def small_backward(gen):
    """`sparse_attention_bwd` of one small case (G = 4, per-head gates, window 12) as a function of its knobs."""
    case = make_case(gen, Hq=8, Hkv=2, T=40, gates="head")
    scale = 32 ** -0.5
    out, lse, br = sparse_attention_fwd(*case.values(), 16, 12, scale, False, True)
    dout = torch.randn(out.shape, generator=gen).to(out)
    return lambda **kw: sparse_attention_bwd(dout, *case.values(), out, lse, br, 16, 12, scale, False, **kw)


def test_deterministic_mode_keeps_the_token_major_backward(gen):
    """Under torch.use_deterministic_algorithms the block-major order (fp32 atomics) is not taken."""
    backward = small_backward(gen)
    token = backward(order="token")
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        block = backward(order="block")
    finally:
        torch.use_deterministic_algorithms(old)
    for name, x, y in zip(NAMES, token, block):
        assert (x is None and y is None) or torch.equal(x, y), name


@pytest.mark.parametrize("merge", [False, True])
def test_gradients_when_k_own_is_k_shared(gen, merge):
    """kv_sharing 'none'/'both' and merge pass one K/V twice: the two gradients must sum to the true one."""
    case = make_case(gen, Hq=8, Hkv=2, T=50, share=True, gates=None if merge else "head")
    got, ref = bwd_both(case, 16, 20, merge=merge, save=False)
    assert rel(got[0], ref[0]) < 1e-4
    assert rel(got[1] + got[3], ref[1] + ref[3]) < 1e-4
    assert rel(got[2] + got[4], ref[2] + ref[4]) < 1e-4
    assert rel(got[7], ref[7]) < 1e-4


def ring_buffer(k, t, W):
    """[B, Hkv, W, d] buffer holding position p of k in slot p % W for the W positions up to t[b]."""
    buf = torch.randn(k.shape[0], k.shape[1], W, k.shape[3], generator=torch.Generator().manual_seed(3)).to(k)
    for b in range(k.shape[0]):
        p = torch.arange(max(0, int(t[b]) - W + 1), int(t[b]) + 1)
        buf[b, :, p % W] = k[b, :, p]
    return buf


@pytest.mark.parametrize("merge,gates,Hq,n_split,fused", [(False, "channel", 8, None, True),
                                                         (False, "head", 16, 3, False), (True, None, 8, 1, True)])
def test_decode_equals_prefill_row(gen, merge, gates, Hq, n_split, fused):
    B, Hkv, T, bs, window = 2, Hq // 4 if Hq == 8 else 1, 50, 16, 20
    case = make_case(gen, B=B, Hq=Hq, Hkv=Hkv, T=T, gates=gates, share=merge)
    (out, _, _), _ = fwd_both(case, bs, window, merge=merge, save=False)
    cache_len = torch.tensor([T, T - 9], dtype=torch.int32, device=DEV)
    t = (cache_len - 1).long()
    rows = lambda x: None if x is None else x[torch.arange(B), :, t].unsqueeze(2)  # noqa: E731
    args = (rows(case["q"]), ring_buffer(case["k_own"], t, 24), ring_buffer(case["v_own"], t, 24),
            case["k_shared"], case["v_shared"], rows(case["indices"]), cache_len, rows(case["gate_sparse"]),
            rows(case["gate_swa"]), case["sinks"], bs, window, 32 ** -0.5, merge)
    dec = sparse_attention_decode(*args, n_split=n_split, fused_combine=fused)
    assert dec.shape == (B, Hq, 1, 32) and dec.dtype == case["q"].dtype
    assert rel(dec, rows(out)) < TOL[torch.float32]
    assert rel(dec, reference.sparse_attention_decode(*args)) < TOL[torch.float32]


@pytest.mark.parametrize("B,Hkv,T,bs,nsel,m_tok", [(2, 2, 45, 16, 3, 8), (1, 3, 100, 8, 4, 16)])
def test_inverse_union_lists_each_blocks_tiles_in_order(gen, B, Hkv, T, bs, nsel, m_tok):
    """The dK/dV pass's CSR (block -> the tiles whose union holds it, with their member bits) against a brute-force
    inversion of the tile unions; unused union slots must not appear (they sort past start[-1])."""
    union, bits, count = tile_block_union(random_indices(B, Hkv, T, bs, nsel, gen), m_tok)
    n_blocks = -(-T // bs)
    tile_of, bits_of, start = inverse_union(union, bits, count, n_blocks)
    assert start.shape == (B * Hkv * n_blocks + 1,) and int(start[-1]) == int(count.sum())
    for b in range(B):
        for g in range(Hkv):
            for j in range(n_blocks):
                k = (b * Hkv + g) * n_blocks + j
                got = [(int(tile_of[e]), int(bits_of[e])) for e in range(int(start[k]), int(start[k + 1]))]
                want = [(t, int(bits[b, g, t, u])) for t in range(union.shape[2]) for u in range(int(count[b, g, t]))
                        if int(union[b, g, t, u]) == j]
                assert got == want, (b, g, j)


def test_block_union_lists_each_tiles_blocks_once(gen):
    idx = random_indices(1, 2, 40, 4, 3, gen)  # [1, 2, 40, 3]
    union, bits, count = tile_block_union(idx, 8)
    for g in range(2):
        for tile in range(5):
            sel = idx[0, g, tile * 8:(tile + 1) * 8]
            want = sorted(set(sel[sel >= 0].tolist()))
            n = int(count[0, g, tile])
            assert union[0, g, tile, :n].tolist() == want
            for u, j in enumerate(want):
                members = [m for m in range(8) if j in sel[m].tolist()]
                assert [m for m in range(8) if (int(bits[0, g, tile, u]) >> m) & 1] == members


@pytest.mark.parametrize("T,bs,nsel,m_tok", [
    (37, 8, 3, 5),  # odd T: the last tile holds 2 tokens; early tokens have -1 padding
    (70, 16, 4, 16),  # nsel * m_tok a power of two
    (23, 4, 6, 1),  # one token per tile
    (67, 4, 2, 64),  # 64 tokens per tile (bit 63 of the membership word), last tile of 3 tokens
])
def test_union_kernel_matches_torch_builder(gen, T, bs, nsel, m_tok):
    idx = random_indices(2, 2, T, bs, nsel, gen)
    idx[1, 0, T - 1] = -1  # a fully padded row at the sequence end
    union, bits, count = tile_block_union(idx, m_tok)
    r_union, r_bits, r_count = tile_block_union_torch(idx, m_tok)
    assert torch.equal(count, r_count)
    valid = torch.arange(union.shape[-1]) < count[..., None]
    assert torch.equal(union[valid], r_union[valid]) and torch.equal(bits[valid], r_bits[valid])


def test_tile_size_grows_when_neighbours_share_blocks(gen):
    """choose_tokens_per_tile: 128-row tiles when a tile's union stays small, 64-row tiles on random selections."""
    T, bs, nsel, G = 96, 4, 4, 8
    shared = random_indices(1, 1, 1, bs, nsel, gen)[..., :1, :].expand(1, 1, T, nsel).contiguous()
    shared[..., :4, :] = -1  # padding only, so every row's selection is causally valid: blocks 0 (t >= 4)
    shared[..., 4:, :] = torch.tensor([0, -1, -1, -1], dtype=torch.int32)
    m_tok, (union, _, count) = choose_tokens_per_tile(shared, G)
    assert m_tok == 16 and int(count.max()) == 1
    m_tok, _ = choose_tokens_per_tile(random_indices(1, 1, T, bs, nsel, gen), G)
    assert m_tok == 8


def test_forward_two_blocks_per_step_matches_reference(gen):
    """pair=True walks the union two blocks at a time (odd union sizes leave a masked half); m_tok='auto'."""
    case = make_case(gen, Hq=8, Hkv=2, T=61, gates="channel")
    args = (*case.values(), 16, 20, 32 ** -0.5, False)
    out, lse, _ = sparse_attention_fwd(*args, False, pair=True, m_tok="auto")
    r_out, r_lse, _ = reference.sparse_attention_fwd(*args, False)
    assert rel(out, r_out) < TOL[torch.float32]
    assert (lse - r_lse).nan_to_num(0.0).abs().max() < 1e-4


def test_supports_names_the_unsupported_value():
    ok = dict(head_dim=128, dtype=torch.bfloat16, group=16, block_size=64, nsel=16)
    assert sparse_attention_supports("sparse_attention", **ok) is None
    assert sparse_attention_supports("sparse_attention_decode", **ok) is None
    assert "96" in sparse_attention_supports("sparse_attention", head_dim=96)
    assert "float64" in sparse_attention_supports("sparse_attention", dtype=torch.float64)
    assert "48" in sparse_attention_supports("sparse_attention", block_size=48)
    assert "full_attention" in sparse_attention_supports("full_attention")


def test_atomic_backward_matches_kv_major(gen):
    """The fp32-atomic dK/dV path (kv_mode='atomic') gives the same gradients as the K/V-major one."""
    backward = small_backward(gen)
    a, b = backward(kv_mode="atomic"), backward(kv_mode="kv_major", order="token")
    for name, x, y in zip(NAMES, a, b):
        assert rel(x, y) < 1e-5, name


def test_merge_reads_the_window_from_k_shared(gen):
    """merge=True ignores k_own/v_own (the functional layer documents them as unread) and gives them zero grads."""
    case = make_case(gen, Hq=8, Hkv=2, T=40, share=False)
    got, ref = bwd_both(case, 16, 12, merge=True)
    (out, _, _), (r_out, _, _) = fwd_both(case, 16, 12, merge=True)
    assert rel(out, r_out) < TOL[torch.float32]
    for name, g, r in zip(NAMES, got, ref):
        if r is not None:
            assert (g.abs().max() == 0 and r.abs().max() == 0) or rel(g, r) < 1e-4, name


@pytest.mark.parametrize("order,kv_mode,merge,gates", [
    ("token", "kv_major", False, "channel"), ("token", "atomic", False, "head"),
    ("block", "kv_major", False, "channel"), ("token", "kv_major", True, None)])
def test_forward_and_backward_write_in_their_inputs_layouts(gen, order, kv_mode, merge, gates):
    """The forward's output and every gradient come back in the layout `torch.empty_like` of what they stand for
    has (what the ops declare, so they return them without a copy), with the reference's values. Inputs laid out as
    an HF attention module makes them: q/k/v transposed views of [B, T, H, d] projections, the gates views of one
    [B, T, 2, Hq, d] projection, dout a transposed view as o_proj's gradient arrives."""
    B, Hq, Hkv, T, d, bs, nsel = 2, 8, 2, 45, 32, 16, 2
    r = lambda *s: torch.randn(*s, generator=gen).to(DEV)  # noqa: E731
    q = r(B, T, Hq, d).transpose(1, 2)
    k_own, v_own, k_sh, v_sh = (r(B, T, Hkv, d).transpose(1, 2) for _ in range(4))
    gs = gw = None
    if gates == "channel":
        gs, gw = torch.rand(B, T, 2, Hq, d, generator=gen).to(DEV).permute(2, 0, 3, 1, 4)
    elif gates == "head":
        gs, gw = torch.rand(B, T, 2, Hq, 1, generator=gen).to(DEV).permute(2, 0, 3, 1, 4)
    case = dict(q=q, k_own=k_own, v_own=v_own, k_shared=k_sh, v_shared=v_sh,
                indices=random_indices(B, Hkv, T, bs, nsel, gen).to(DEV), gate_sparse=gs, gate_swa=gw,
                sinks=r(Hq))
    scale = d ** -0.5
    out, lse, br = sparse_attention_fwd(*case.values(), bs, 12, scale, merge, False, order=order)
    assert out.stride() == torch.empty_like(q).stride(), out.stride()
    assert rel(out, reference.sparse_attention_fwd(*case.values(), bs, 12, scale, merge, False)[0]) < 1e-5
    dout = r(B, T, Hq, d).transpose(1, 2)
    got = sparse_attention_bwd(dout, *case.values(), out, lse, br, bs, 12, scale, merge, order=order,
                               kv_mode=kv_mode)
    ref = reference.sparse_attention_bwd(dout, *case.values(), out, lse, br, bs, 12, scale, merge)
    assert_grads_match(got, ref)
    for name, g, x in zip(NAMES, got, (q, k_own, v_own, k_sh, v_sh, gs, gw)):
        if g is not None and not (merge and name in ("dk_own", "dv_own")):  # merge: zeros, unread inputs
            assert g.stride() == torch.empty_like(x).stride(), (name, g.stride(), x.stride())
