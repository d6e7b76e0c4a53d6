"""The flex backend against the reference backend: outputs, lse, block scores, indices and gradients, on CPU.

Sizes are odd on purpose: T not a multiple of the block, T below topk, T below the window, GQA groups 1 and 4,
batch 2, gates and sinks on and off, merge, window 0.
"""
from __future__ import annotations

import math
import types

import pytest
import torch

from hysparse_compile import functional as F
from hysparse_compile.kernels import flex, reference

ATOL = 2e-5


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(g: torch.Generator, *shape) -> torch.Tensor:
    return torch.randn(*shape, generator=g)


def _qkv(g, B, Hq, Hkv, T, d):
    return _randn(g, B, Hq, T, d), _randn(g, B, Hkv, T, d), _randn(g, B, Hkv, T, d)


def _random_indices(g, B, Hkv, T, block_size, nsel):
    """Distinct candidate blocks per row (j * block_size <= t), ascending, -1 padded: neighbouring tokens
    disagree, the case where a per-tile block mask is loosest and the mask_mod has to stay exact."""
    nb = -(-T // block_size)
    keys = torch.rand(B, Hkv, T, nb, generator=g)
    cand = torch.arange(nb).view(1, 1, 1, nb) * block_size <= torch.arange(T).view(1, 1, T, 1)
    keys = torch.where(cand, keys, torch.full_like(keys, -1.0))
    top = keys.topk(min(nsel, nb), dim=-1)
    idx = torch.where(top.values >= 0, top.indices, torch.full_like(top.indices, nb)).sort(-1).values
    idx = torch.where(idx == nb, torch.full_like(idx, -1), idx).to(torch.int32)
    if idx.shape[-1] < nsel:
        idx = torch.cat([idx, idx.new_full((B, Hkv, T, nsel - idx.shape[-1]), -1)], -1)
    return idx


def _close(a, b, atol=ATOL):
    assert a.shape == b.shape, (a.shape, b.shape)
    torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=1e-4)


FULL_CASES = [  # B, Hq, Hkv, T, d, block_size, topk
    (2, 4, 1, 77, 16, 16, 48),  # T not a multiple of the block, GQA 4
    (1, 2, 2, 20, 16, 16, 64),  # T < topk: every candidate selected, -1 padding
    (2, 4, 4, 64, 32, 16, 32),  # T a multiple of the block, GQA 1
]


@pytest.mark.parametrize("B,Hq,Hkv,T,d,bs,topk", FULL_CASES)
def test_full_layer_matches_reference(B, Hq, Hkv, T, d, bs, topk):
    g = _gen(T * 7 + Hq)
    q, k, v = _qkv(g, B, Hq, Hkv, T, d)
    scale = 1 / math.sqrt(d)
    out, idx, lse, scores = flex.full_attention_fwd(q, k, v, bs, topk, scale, True)
    r_out, r_idx, r_lse, r_scores = reference.full_attention_fwd(q, k, v, bs, topk, scale, True)
    _close(out, r_out)
    _close(lse, r_lse)
    _close(scores, r_scores)
    assert idx.dtype == torch.int32 and torch.equal(idx, r_idx)


def test_full_layer_without_scores_returns_empty_scores():
    g = _gen(1)
    q, k, v = _qkv(g, 1, 2, 1, 40, 16)
    _, _, _, scores = flex.full_attention_fwd(q, k, v, 16, 32, 0.25, False)
    assert scores.numel() == 0


def test_full_layer_selection_ignores_future_blocks():
    g = _gen(2)
    q, k, v = _qkv(g, 1, 2, 1, 70, 16)
    _, idx, _, _ = flex.full_attention_fwd(q, k, v, 16, 48, 0.25, False)
    t = torch.arange(70).view(1, 1, 70, 1)
    assert bool(((idx < 0) | (idx * 16 <= t)).all())
    assert bool((idx[0, 0, 0] == torch.tensor([0, -1, -1], dtype=torch.int32)).all())


@pytest.mark.parametrize("B,Hq,Hkv,T,d,bs,topk", FULL_CASES[:2])
def test_full_layer_gradients_match_reference(B, Hq, Hkv, T, d, bs, topk):
    g = _gen(T + 3)
    q, k, v = _qkv(g, B, Hq, Hkv, T, d)
    dout = _randn(g, B, Hq, T, d)
    out, _, lse, _ = flex.full_attention_fwd(q, k, v, bs, topk, 0.3, False)
    got = flex.full_attention_bwd(dout, q, k, v, out, lse, 0.3)
    want = reference.full_attention_bwd(dout, q, k, v, out, lse, 0.3)
    for a, b in zip(got, want):
        _close(a, b, atol=1e-4)


SPARSE_CASES = [  # B, Hq, Hkv, T, block_size, nsel, window, merge, gates, sinks
    (2, 4, 1, 77, 16, 3, 20, False, "channel", True),
    (2, 4, 1, 77, 16, 3, 20, False, None, False),
    (1, 4, 4, 50, 16, 2, 0, False, "head", True),  # window 0: sparse branch only
    (2, 4, 1, 30, 16, 4, 64, False, "head", False),  # T < window, T < topk
    (2, 4, 1, 77, 16, 3, 20, True, None, True),  # merged selected-or-window softmax, one sink
    (1, 2, 2, 45, 16, 2, 0, True, None, False),  # merge with window 0
]


def _sparse_inputs(seed, B, Hq, Hkv, T, bs, nsel, window, merge, gates, sinks, d=16):
    g = _gen(seed)
    q, k_sh, v_sh = _qkv(g, B, Hq, Hkv, T, d)
    k_own, v_own = (k_sh, v_sh) if merge else (_randn(g, B, Hkv, T, d), _randn(g, B, Hkv, T, d))
    width = {"channel": d, "head": 1}.get(gates)
    gate_sp = torch.sigmoid(_randn(g, B, Hq, T, width)) if width else None
    gate_swa = torch.sigmoid(_randn(g, B, Hq, T, width)) if width else None
    sink = _randn(g, Hq) if sinks else None
    idx = _random_indices(g, B, Hkv, T, bs, nsel)
    return (q, k_own, v_own, k_sh, v_sh, idx, gate_sp, gate_swa, sink), _randn(g, B, Hq, T, d)


@pytest.mark.parametrize("B,Hq,Hkv,T,bs,nsel,window,merge,gates,sinks", SPARSE_CASES)
def test_sparse_layer_matches_reference(B, Hq, Hkv, T, bs, nsel, window, merge, gates, sinks):
    tensors, dout = _sparse_inputs(T + nsel + window, B, Hq, Hkv, T, bs, nsel, window, merge, gates, sinks)
    meta = (bs, window, 0.25, merge)
    out, lse, branches = flex.sparse_attention_fwd(*tensors, *meta, True)
    r_out, r_lse, _ = reference.sparse_attention_fwd(*tensors, *meta, False)
    _close(out, r_out)
    assert torch.equal(torch.isfinite(lse), torch.isfinite(r_lse))
    _close(torch.nan_to_num(lse, neginf=0.0), torch.nan_to_num(r_lse, neginf=0.0))
    assert branches.numel() == 0
    got = flex.sparse_attention_bwd(dout, *tensors, out, lse, branches, *meta)
    want = reference.sparse_attention_bwd(dout, *tensors, r_out, r_lse, branches, *meta)
    for name, a, b in zip(("dq", "dk_own", "dv_own", "dk_sh", "dv_sh", "dg_sp", "dg_swa", "dsinks"), got, want):
        assert (a is None) == (b is None), name
        if a is not None:
            _close(a, b, atol=1e-4)


def test_sparse_rows_with_no_selected_block_give_zero_and_minus_inf_lse():
    tensors, _ = _sparse_inputs(5, 1, 2, 1, 40, 16, 2, 0, False, None, True)
    idx = tensors[5].clone()
    idx[:, :, 10:20] = -1
    tensors = (*tensors[:5], idx, *tensors[6:])
    out, lse, _ = flex.sparse_attention_fwd(*tensors, 16, 0, 0.25, False, False)
    assert bool((out[:, :, 10:20] == 0).all())
    assert bool(torch.isneginf(lse[:, :, 10:20, 0]).all()) and bool(torch.isneginf(lse[..., 1]).all())
    assert bool(torch.isfinite(lse[:, :, :10, 0]).all())


def test_sparse_branch_follows_the_full_layer_selection():
    g = _gen(9)
    q, k, v = _qkv(g, 2, 4, 1, 90, 16)
    _, idx, _, _ = flex.full_attention_fwd(q, k, v, 16, 32, 0.25, False)
    q2 = _randn(g, 2, 4, 90, 16)
    args = (q2, k, v, k, v, idx, None, None, None, 16, 24, 0.25, False, False)
    _close(flex.sparse_attention_fwd(*args)[0], reference.sparse_attention_fwd(*args)[0])


def test_decode_equals_last_prefill_row():
    g = _gen(11)
    B, Hq, Hkv, S, d, bs, topk, window = 2, 4, 1, 50, 16, 16, 32, 8
    q, k, v = _qkv(g, B, Hq, Hkv, S, d)
    k_own, v_own = _randn(g, B, Hkv, S, d), _randn(g, B, Hkv, S, d)
    cache_len = torch.tensor([50, 37], dtype=torch.int32)
    for b, n in enumerate(cache_len.tolist()):  # the new token's query sits at row n - 1
        q[b, :, -1] = q[b, :, n - 1]
    out, idx = flex.full_attention_decode(q[:, :, -1:], k, v, cache_len, bs, topk, 0.25)
    slots = torch.arange(window)
    k_win = torch.empty(B, Hkv, window, d)
    v_win = torch.empty(B, Hkv, window, d)
    for b, n in enumerate(cache_len.tolist()):
        t = n - 1
        pos = t - torch.remainder(t - slots, window)  # position held by each ring slot
        k_win[b], v_win[b] = k_own[b][:, pos], v_own[b][:, pos]
        p_out, p_idx, _, _ = flex.full_attention_fwd(q[b:b + 1, :, :n], k[b:b + 1, :, :n], v[b:b + 1, :, :n], bs,
                                                     topk, 0.25, False)
        _close(out[b:b + 1], p_out[:, :, -1:])
        assert torch.equal(idx[b:b + 1], p_idx[:, :, -1:])
        s_out = flex.sparse_attention_fwd(q[b:b + 1, :, :n], k_own[b:b + 1, :, :n], v_own[b:b + 1, :, :n],
                                          k[b:b + 1, :, :n], v[b:b + 1, :, :n], p_idx, None, None, None, bs, window,
                                          0.25, False, False)[0]
        d_out = flex.sparse_attention_decode(q[b:b + 1, :, -1:], k_win[b:b + 1], v_win[b:b + 1], k[b:b + 1],
                                             v[b:b + 1], idx[b:b + 1], cache_len[b:b + 1], None, None, None, bs,
                                             window, 0.25, False)
        _close(d_out, s_out[:, :, -1:])


def test_supports_rejects_what_flex_cannot_run():
    cuda = torch.device("cuda")
    assert "float64" in flex.supports("full_attention", device=cuda, dtype=torch.float64, head_dim=64)
    assert "head dim" in flex.supports("sparse_attention", device=cuda, dtype=torch.bfloat16, head_dim=8)
    assert "block_size" in flex.supports("sparse_attention", device=cuda, dtype="bfloat16", head_dim=64,
                                         block_size=8)
    assert "mps" in flex.supports("full_attention", device="mps")
    assert flex.supports("full_attention", device="cpu", dtype=torch.float64, head_dim=8) is None
    assert flex.supports("sparse_attention", device=cuda, dtype=torch.bfloat16, head_dim=128, block_size=64) is None


def test_flex_trains_through_the_ops_on_cpu():
    """Inputs that require grad reach the flex forward inside the custom op (grad mode off there)."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 40, 16, generator=g, requires_grad=True)
    k, v = (torch.randn(1, 2, 40, 16, generator=g, requires_grad=True) for _ in range(2))
    out, idx = F.full_attention(q, k, v, block_size=16, topk=16, backend="flex")
    y = F.sparse_attention(q, k, v, k, v, idx, block_size=16, window=4, sinks=torch.zeros(4), backend="flex")
    (out.sum() + y.square().sum()).backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    out, idx = F.full_attention(q, k, v, block_size=16, topk=16, backend="reference")
    y = F.sparse_attention(q, k, v, k, v, idx, block_size=16, window=4, sinks=torch.zeros(4), backend="reference")
    (out.sum() + y.square().sum()).backward()
    for a, t in zip(grads, (q, k, v)):
        assert torch.allclose(a, t.grad, atol=1e-5)


def test_coarse_mask_blocks_give_the_same_sparse_branch():
    """The CUDA backward recomputes with 128-key mask blocks (a superset); the per-token mask_mod keeps it exact."""
    from hysparse_compile.kernels.flex.full_attention import flex_attend
    from hysparse_compile.kernels.flex.sparse_attention import sparse_block_mask
    from oracle import random_indices

    g = torch.Generator().manual_seed(5)
    B, Hq, Hkv, T, d, bs = 1, 4, 2, 300, 16, 64
    q, k, v = torch.randn(B, Hq, T, d, generator=g), torch.randn(B, Hkv, T, d, generator=g), torch.randn(B, Hkv, T, d, generator=g)
    idx = random_indices(B, Hkv, T, bs, 2, generator=g)
    fine, _ = flex_attend(q, k, v, sparse_block_mask(idx, T, Hq, bs), 0.25)
    coarse, _ = flex_attend(q, k, v, sparse_block_mask(idx, T, Hq, bs, kv_block=128), 0.25)
    assert torch.allclose(fine, coarse, atol=1e-6)


def test_extend_forces_the_main_flex_kernel_past_the_decoding_kernels_rows():
    # On CUDA, Inductor picks flex's decoding kernel below 128 query rows with a one-head block mask; it packs R x G
    # rows of a KV head into one tile and had no valid configuration at R = 64, G = 4 on an H100
    # (docs/benchmarks.md, "Extend"). flex_attend forces the main kernel there, for every caller.
    from hysparse_compile.kernels.flex.full_attention import kernel_choice

    class Fake:
        def __init__(self, shape, device):
            self.shape, self.device = shape, torch.device(device)

    one_head = types.SimpleNamespace(kv_num_blocks=torch.zeros(1, 1, 1))
    per_head = types.SimpleNamespace(kv_num_blocks=torch.zeros(1, 32, 1))
    k = Fake((1, 8, 4096, 128), "cuda")
    force = {"FORCE_USE_FLEX_ATTENTION": True}
    assert kernel_choice(Fake((1, 32, 8, 128), "cuda"), k, one_head, None) is None  # 32 rows: the decoding kernel ran
    assert kernel_choice(Fake((1, 32, 16, 128), "cuda"), k, one_head, None) is None  # 64 rows
    assert kernel_choice(Fake((1, 32, 17, 128), "cuda"), k, one_head, None) == force
    assert kernel_choice(Fake((1, 32, 64, 128), "cuda"), k, one_head, None) == force  # the case that failed
    assert kernel_choice(Fake((1, 64, 8, 128), "cuda"), Fake((1, 4, 4096, 128), "cuda"), one_head, None) == force
    assert kernel_choice(Fake((1, 32, 64, 128), "cpu"), Fake((1, 8, 4096, 128), "cpu"), one_head, None) is None
    # the main kernel already runs: 128 rows or more, or a block mask per query head; options are kept
    assert kernel_choice(Fake((1, 32, 128, 128), "cuda"), k, one_head, None) is None
    assert kernel_choice(Fake((1, 32, 64, 128), "cuda"), k, per_head, None) is None
    assert kernel_choice(Fake((1, 32, 64, 128), "cuda"), k, one_head, {"BLOCK_M": 64}) == {"BLOCK_M": 64, **force}
