"""The reference backend against the float64 brute-force oracle (tests/oracle.py), at odd shapes."""
import math

import pytest
import torch

from hysparse_compile import functional as F
from oracle import oracle_full, oracle_sparse, random_indices, rel_err

# (B, Hq, Hkv, T, d, block_size, topk): T not a multiple of the block, T < topk, GQA groups 1/2/4/8/16, batch > 1
FULL_SHAPES = [
    (1, 1, 1, 16, 16, 16, 16),
    (2, 4, 1, 50, 16, 16, 32),
    (1, 8, 2, 97, 64, 16, 48),
    (2, 16, 1, 40, 16, 16, 64),
    (1, 2, 2, 30, 128, 16, 32),
    (2, 8, 4, 70, 32, 32, 64),
    (1, 16, 2, 33, 16, 16, 16),
]
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}


def rand(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen).to(dtype)


@pytest.mark.parametrize("shape", FULL_SHAPES, ids=lambda s: "B{}_Hq{}_Hkv{}_T{}_d{}_bs{}_k{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_full_attention_matches_oracle(gen, shape, dtype):
    B, Hq, Hkv, T, d, bs, topk = shape
    q, k, v = rand(gen, B, Hq, T, d, dtype=dtype), rand(gen, B, Hkv, T, d, dtype=dtype), rand(gen, B, Hkv, T, d, dtype=dtype)
    out, idx, scores = F.full_attention(q, k, v, block_size=bs, topk=topk, backend="reference", return_scores=True)
    o_ref, s_ref, i_ref = oracle_full(q, k, v, bs, topk)
    assert out.dtype == dtype and idx.dtype == torch.int32
    assert rel_err(out, o_ref) < TOL[dtype]
    assert rel_err(scores, s_ref) < (1e-6 if dtype == torch.float32 else 1e-5)
    assert torch.equal(idx.long(), i_ref)


def test_full_attention_keeps_a_custom_scale(gen):
    q, k, v = rand(gen, 1, 4, 40, 16), rand(gen, 1, 2, 40, 16), rand(gen, 1, 2, 40, 16)
    out, idx = F.full_attention(q, k, v, block_size=16, topk=16, scale=1.0)
    o_ref, _, i_ref = oracle_full(q, k, v, 16, 16, scale=1.0)
    assert rel_err(out, o_ref) < 1e-5 and torch.equal(idx.long(), i_ref)
    out_default, _ = F.full_attention(q, k, v, block_size=16, topk=16)
    assert rel_err(out_default, o_ref) > 1e-3  # the scale is really used


def test_selection_ignores_future_blocks(gen):
    T, bs = 64, 16
    q, k, v = rand(gen, 1, 2, T, 16), rand(gen, 1, 1, T, 16), rand(gen, 1, 1, T, 16)
    k[:, :, 48:] *= 50  # future keys that would dominate if they were candidates
    _, idx = F.full_attention(q, k, v, block_size=bs, topk=32)
    for t in range(T):
        chosen = [j for j in idx[0, 0, t].tolist() if j >= 0]
        assert all(j * bs <= t for j in chosen), (t, chosen)
        assert len(chosen) == min(2, t // bs + 1)


def test_selection_pads_with_minus_one_when_few_blocks(gen):
    q, k, v = rand(gen, 1, 1, 20, 16), rand(gen, 1, 1, 20, 16), rand(gen, 1, 1, 20, 16)
    _, idx = F.full_attention(q, k, v, block_size=16, topk=64)  # nsel 4, at most 2 blocks exist
    assert idx[0, 0, 5].tolist() == [0, -1, -1, -1]
    assert idx[0, 0, 19].tolist() == [0, 1, -1, -1]


def test_selection_breaks_ties_toward_lower_block(gen):
    bs, T = 16, 64
    d = 16
    q = rand(gen, 1, 1, T, d)
    k = rand(gen, 1, 1, bs, d).repeat(1, 1, T // bs, 1)  # every block holds the same keys -> equal block scores
    v = rand(gen, 1, 1, T, d)
    _, idx, scores = F.full_attention(q, k, v, block_size=bs, topk=32, return_scores=True)
    t = T - 1
    assert torch.allclose(scores[0, 0, t], scores[0, 0, t, :1].expand(4))
    assert idx[0, 0, t].tolist() == [0, 1]


def test_selection_uses_group_max_over_query_heads(gen):
    T, bs = 64, 16
    q, k, v = rand(gen, 1, 4, T, 16), rand(gen, 1, 1, T, 16), rand(gen, 1, 1, T, 16)
    _, idx, scores = F.full_attention(q, k, v, block_size=bs, topk=16, return_scores=True)
    group = scores[0, :, T - 1].max(0).values  # [nb]
    assert idx[0, 0, T - 1, 0].item() == int(group.argmax())


SPARSE_CASES = [
    # B, Hq, Hkv, T, d, bs, nsel, window, gates, sinks, merge
    (1, 4, 1, 50, 16, 16, 2, 8, "element", True, False),
    (2, 8, 2, 37, 16, 16, 3, 5, "head", True, False),
    (1, 16, 1, 40, 16, 16, 2, 64, None, True, False),  # T < window
    (2, 2, 2, 45, 32, 16, 4, 3, "element", False, False),  # T < topk
    (1, 8, 8, 33, 16, 16, 1, 16, None, False, False),
    (1, 4, 1, 50, 16, 16, 2, None, "element", True, False),  # swa=False
    (2, 8, 2, 41, 16, 16, 2, 7, None, False, True),  # merge (training-free)
    (1, 4, 2, 30, 16, 16, 2, 4, None, True, True),  # merge with sinks
]


def _sparse_inputs(gen, B, Hq, Hkv, T, d, bs, nsel, gates, sinks, dtype=torch.float32):
    q = rand(gen, B, Hq, T, d, dtype=dtype)
    kv = [rand(gen, B, Hkv, T, d, dtype=dtype) for _ in range(4)]
    idx = random_indices(B, Hkv, T, bs, nsel, generator=gen)
    last = {"element": d, "head": 1, None: None}[gates]
    gs = gw = None
    if last:
        gs = torch.sigmoid(rand(gen, B, Hq, T, last, dtype=dtype))
        gw = torch.sigmoid(rand(gen, B, Hq, T, last, dtype=dtype))
    sk = rand(gen, Hq) if sinks else None
    return q, kv, idx, gs, gw, sk


@pytest.mark.parametrize("case", SPARSE_CASES, ids=lambda c: "B{}_Hq{}_Hkv{}_T{}_d{}_bs{}_n{}_w{}_{}_{}_{}".format(*c))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_attention_matches_oracle(gen, case, dtype):
    B, Hq, Hkv, T, d, bs, nsel, window, gates, sinks, merge = case
    q, (ko, vo, ks, vs), idx, gs, gw, sk = _sparse_inputs(gen, B, Hq, Hkv, T, d, bs, nsel, None if merge else gates, sinks, dtype)
    if merge:
        ko, vo = ks, vs
    if window is None:
        gw = None
    out = F.sparse_attention(q, ko, vo, ks, vs, idx, block_size=bs, window=window, gate_sparse=gs, gate_swa=gw,
                             sinks=sk, merge=merge, backend="reference")
    ref = oracle_sparse(q, ko, vo, ks, vs, idx, bs, window, gs, gw, sk, merge=merge)
    assert out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("kv_sharing", ["sparse_branch", "none", "both"])
def test_kv_sharing_ablations_read_the_right_kv(gen, kv_sharing):
    B, Hq, Hkv, T, d, bs = 1, 4, 2, 40, 16, 16
    q = rand(gen, B, Hq, T, d)
    k_full, v_full, k_own, v_own = (rand(gen, B, Hkv, T, d) for _ in range(4))
    idx = random_indices(B, Hkv, T, bs, 2, generator=gen)
    shared = {"sparse_branch": (k_full, v_full), "none": (k_own, v_own), "both": (k_full, v_full)}[kv_sharing]
    own = {"sparse_branch": (k_own, v_own), "none": (k_own, v_own), "both": (k_full, v_full)}[kv_sharing]
    out = F.sparse_attention(q, *own, *shared, idx, block_size=bs, window=6)
    ref = oracle_sparse(q, *own, *shared, idx, bs, 6)
    assert rel_err(out, ref) < 1e-5


def test_merge_with_every_block_selected_is_full_attention(gen):
    q, k, v = rand(gen, 2, 4, 45, 16), rand(gen, 2, 2, 45, 16), rand(gen, 2, 2, 45, 16)
    _, idx = F.full_attention(q, k, v, block_size=16, topk=48)
    out = F.sparse_attention(q, k, v, k, v, idx, block_size=16, window=4, merge=True)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                           is_causal=True)
    assert rel_err(out, ref) < 1e-5


def test_sinks_shrink_the_branch_outputs(gen):
    q, k, v = rand(gen, 1, 2, 20, 16), rand(gen, 1, 1, 20, 16), rand(gen, 1, 1, 20, 16)
    idx = random_indices(1, 1, 20, 16, 1, generator=gen)
    plain = F.sparse_attention(q, k, v, k, v, idx, block_size=16, window=4)
    huge = F.sparse_attention(q, k, v, k, v, idx, block_size=16, window=4, sinks=torch.full((2,), 60.0))
    assert huge.abs().max() < 1e-6 * plain.abs().max()


@pytest.mark.parametrize("G", [1, 4])
def test_full_decode_equals_prefill_row(gen, G):
    B, Hkv, S, d, bs, topk = 2, 2, 70, 16, 16, 32
    q_all, k, v = rand(gen, B, Hkv * G, S, d), rand(gen, B, Hkv, S, d), rand(gen, B, Hkv, S, d)
    cache_len = torch.tensor([45, 70], dtype=torch.int32)
    q_new = torch.stack([q_all[0, :, 44], q_all[1, :, 69]])[:, :, None]  # each row's token at cache_len - 1
    out, idx = F.full_attention_decode(q_new,
                                       k, v, cache_len, block_size=bs, topk=topk)
    for b, L in enumerate(cache_len.tolist()):
        o_ref, i_ref = F.full_attention(q_all[b:b + 1, :, :L], k[b:b + 1, :, :L], v[b:b + 1, :, :L], block_size=bs,
                                        topk=topk)
        assert rel_err(out[b, :, 0], o_ref[0, :, L - 1]) < 1e-5
        assert torch.equal(idx[b, :, 0], i_ref[0, :, L - 1])


@pytest.mark.parametrize("merge", [False, True])
def test_sparse_decode_equals_prefill_row(gen, merge):
    B, Hq, Hkv, S, d, bs, w = 2, 4, 2, 60, 16, 16, 8
    q = rand(gen, B, Hq, S, d)
    k_own, v_own, k_sh, v_sh = (rand(gen, B, Hkv, S, d) for _ in range(4))
    if merge:
        k_own, v_own = k_sh, v_sh
    idx = random_indices(B, Hkv, S, bs, 2, generator=gen)
    gs = None if merge else torch.sigmoid(rand(gen, B, Hq, S, d))
    gw = None if merge else torch.sigmoid(rand(gen, B, Hq, S, 1))
    sk = rand(gen, Hq)
    full = F.sparse_attention(q, k_own, v_own, k_sh, v_sh, idx, block_size=bs, window=w, gate_sparse=gs, gate_swa=gw,
                              sinks=sk, merge=merge)
    W = 11  # ring buffer larger than the window
    for t in (0, 5, 37, 59):
        cache_len = torch.full((B,), t + 1, dtype=torch.int32)
        slots = torch.arange(max(0, t - W + 1), t + 1)
        k_win = torch.full((B, Hkv, W, d), 7.0)  # stale slots must be ignored
        v_win = torch.full((B, Hkv, W, d), 7.0)
        k_win[:, :, slots % W], v_win[:, :, slots % W] = k_own[:, :, slots], v_own[:, :, slots]
        pick = lambda g: None if g is None else g[:, :, t:t + 1]  # noqa: E731
        out = F.sparse_attention_decode(q[:, :, t:t + 1], k_win, v_win, k_sh, v_sh, idx[:, :, t:t + 1], cache_len,
                                        block_size=bs, window=w, gate_sparse=pick(gs), gate_swa=pick(gw), sinks=sk,
                                        merge=merge)
        assert rel_err(out[:, :, 0], full[:, :, t]) < 1e-5, t


def test_gradients_pass_gradcheck_in_float64(gen):
    """torch's gradcheck through the custom ops' autograd, in fast mode (random projections of the Jacobian: ~100x
    cheaper than the element-wise mode). Element-wise gradients are compared with float64 autograd through the
    oracle in test_grid_full.py / test_grid_sparse.py (`*_gradients_match_oracle*`)."""
    d64 = dict(dtype=torch.float64)
    q = torch.randn(1, 4, 20, 8, generator=gen, **d64).requires_grad_()
    k, v, ko, vo = (torch.randn(1, 2, 20, 8, generator=gen, **d64).requires_grad_() for _ in range(4))
    gs = torch.rand(1, 4, 20, 8, generator=gen, **d64).requires_grad_()
    gw = torch.rand(1, 4, 20, 1, generator=gen, **d64).requires_grad_()
    sk = torch.randn(4, generator=gen, **d64).requires_grad_()
    assert torch.autograd.gradcheck(lambda q, k, v: F.full_attention(q, k, v, block_size=16, topk=16)[0], (q, k, v),
                                    fast_mode=True)
    _, idx = F.full_attention(q, k, v, block_size=16, topk=16)
    sparse = lambda *a: F.sparse_attention(*a[:5], idx, block_size=16, window=5, gate_sparse=a[5], gate_swa=a[6],  # noqa: E731
                                           sinks=a[7])
    assert torch.autograd.gradcheck(sparse, (q, ko, vo, k, v, gs, gw, sk), fast_mode=True)
    merged = lambda q, k, v, s: F.sparse_attention(q, k, v, k, v, idx, block_size=16, window=5, sinks=s, merge=True)  # noqa: E731
    assert torch.autograd.gradcheck(merged, (q, k, v, sk), fast_mode=True)


def test_bfloat16_gradients_match_float64(gen):
    q = torch.randn(2, 8, 37, 16, generator=gen)
    k, v = torch.randn(2, 2, 37, 16, generator=gen), torch.randn(2, 2, 37, 16, generator=gen)
    grads = {}
    for dt in (torch.float64, torch.bfloat16):
        leaves = [x.to(dt).requires_grad_() for x in (q, k, v)]
        out, idx = F.full_attention(*leaves, block_size=16, topk=16)
        y = F.sparse_attention(leaves[0], leaves[1], leaves[2], leaves[1], leaves[2], idx, block_size=16, window=4)
        (out.float() * 1.3 + y.float()).square().sum().backward()
        grads[dt] = [x.grad for x in leaves]
    for g_bf, g_64 in zip(grads[torch.bfloat16], grads[torch.float64]):
        assert g_bf.dtype == torch.bfloat16
        assert rel_err(g_bf, g_64) < 3e-2


def test_default_scale_is_inverse_sqrt_head_dim(gen):
    q, k, v = rand(gen, 1, 2, 20, 64), rand(gen, 1, 2, 20, 64), rand(gen, 1, 2, 20, 64)
    a, _ = F.full_attention(q, k, v, block_size=16, topk=16)
    b, _ = F.full_attention(q, k, v, block_size=16, topk=16, scale=1 / math.sqrt(64))
    assert torch.equal(a, b)
