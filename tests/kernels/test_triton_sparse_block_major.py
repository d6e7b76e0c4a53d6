"""K/V-block-major sparse branch of the Triton sparse-layer forward (`order="block"`) against the float64 reference.

CPU cases run under TRITON_INTERPRET=1 in float32 (tiny shapes: block 16, d 16/32, T < topk, odd T).
"""

import os

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from oracle import random_indices  # noqa: E402

from hysparse_compile import functional as F  # noqa: E402
from hysparse_compile.kernels import reference  # noqa: E402
from hysparse_compile.kernels.triton import sparse_attention as tsa  # noqa: E402
from hysparse_compile.kernels.triton.block_major import combine_partials, token_lists  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
BS = 16
TOL = 1e-5 if DEV == "cpu" else 3e-3  # on a GPU, tl.dot rounds float32 inputs to TF32


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def make_case(gen, B, Hq, Hkv, T, d, nsel, gates=None, sinks=True):
    """float32 inputs of one sparse layer; gates None | 'head' ([B,Hq,T,1]) | 'channel' ([B,Hq,T,d], strided)."""
    r = lambda *s: torch.randn(*s, generator=gen).to(DEV)  # noqa: E731
    x = dict(q=r(B, Hq, T, d), k_own=r(B, Hkv, T, d), v_own=r(B, Hkv, T, d), k_shared=r(B, Hkv, T, d),
             v_shared=r(B, Hkv, T, d), indices=random_indices(B, Hkv, T, BS, nsel, gen).to(DEV), gate_sparse=None,
             gate_swa=None, sinks=torch.randn(Hq, generator=gen).to(DEV) if sinks else None)
    if gates == "head":
        x["gate_sparse"], x["gate_swa"] = (torch.rand(B, Hq, T, 1, generator=gen).to(DEV) for _ in range(2))
    elif gates == "channel":  # non-contiguous, as a slice of a [B, T, Hq, 2d] projection would be
        both = torch.rand(B, T, Hq, 2 * d, generator=gen).to(DEV)
        x["gate_sparse"], x["gate_swa"] = both[..., :d].transpose(1, 2), both[..., d:].transpose(1, 2)
    return x


def f64(x):
    return {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in x.items()}


def check_forward(x, window, **kw):
    d = x["q"].shape[-1]
    args = (*x.values(), BS, window, d ** -0.5, False)
    out, lse, br = tsa.sparse_attention_fwd(*args, True, order="block", **kw)
    r_out, r_lse, r_br = reference.sparse_attention_fwd(*f64(x).values(), BS, window, d ** -0.5, False, True)
    assert out.dtype == torch.float32 and lse.shape == r_lse.shape and br.shape == r_br.shape
    assert rel(out, r_out) < TOL, rel(out, r_out)
    assert torch.equal(torch.isinf(lse), torch.isinf(r_lse))
    fin = torch.isfinite(r_lse)
    assert ((lse[fin].double() - r_lse[fin]).abs() / r_lse[fin].abs().clamp_min(1.0)).max() < TOL
    assert rel(br, r_br) < TOL, "saved branch outputs must be the ungated branches"
    return out, lse, br


@pytest.mark.parametrize("combine", ["separate", "fused"])
@pytest.mark.parametrize("B,Hq,Hkv,T,d,nsel,gates,sinks,window", [
    (2, 2, 2, 45, 16, 3, None, True, 20),  # G = 1, batch 2, T not a multiple of the block
    (2, 8, 2, 77, 32, 4, "channel", True, 24),  # G = 4, strided per-channel gates
    (2, 8, 1, 45, 16, 2, "head", False, 0),  # G = 8, per-head gates, no SWA branch
    (2, 16, 1, 45, 16, 3, "head", True, 100),  # G = 16, T < window
])
def test_block_major_forward_matches_float64_reference(gen, B, Hq, Hkv, T, d, nsel, gates, sinks, window, combine):
    """Both combines: the combine kernel then the last kernel, or the last kernel folding the partials itself."""
    x = make_case(gen, B, Hq, Hkv, T, d, nsel, gates, sinks)
    out, lse, _ = check_forward(x, window, block_major=dict(combine=combine))
    if window == 0:
        assert torch.isinf(lse[..., 1]).all()
    t_out, t_lse, _ = tsa.sparse_attention_fwd(*x.values(), BS, window, d ** -0.5, False, False, order="token")
    assert rel(out, t_out) < TOL and (lse - t_lse).nan_to_num(0.0).abs().max() < TOL


@pytest.mark.parametrize("combine", ["separate", "fused"])
def test_block_major_chunks_and_knobs(gen, combine):
    """Tiny partial budget (the sequence runs in many token chunks), odd chunk/tok knobs, padded slots (T < topk)."""
    x = make_case(gen, 2, 12, 4, 45, 16, 5, "channel")  # G = 3: rows are not a power of two
    check_forward(x, 9, block_major=dict(max_partial_bytes=4000, chunk=5, tok=3, num_warps=2, num_stages=1,
                                         combine=combine))


@pytest.mark.parametrize("combine", ["separate", "fused"])
def test_rows_without_any_selection(gen, combine):
    """Rows whose selection is all -1 (or only out-of-range blocks): the sparse branch is empty (lse -inf, output 0)
    in both orders, and the SWA branch still works."""
    x = make_case(gen, 1, 4, 1, 45, 16, 2, "head")
    x["indices"][:, :, 5:9] = -1
    x["indices"][:, :, 30, 1] = 99  # past the last block: ignored, as the reference does
    out, lse, _ = check_forward(x, 12, block_major=dict(combine=combine))
    assert torch.isinf(lse[:, :, 5:9, 0]).all()


def test_fused_combine_drops_unwritten_slots_whatever_their_bits(gen, monkeypatch):
    """The partial buffers come from torch.empty: a slot no block filled keeps whatever bits were there (NaN here)
    and only its -inf log-sum-exp marks it; the fused combine must select it away, not multiply it by 0."""
    real_empty = torch.empty

    def nan_empty(*a, **k):
        return real_empty(*a, **k).fill_(float("nan"))

    x = make_case(gen, 2, 8, 2, 45, 16, 5, "channel")  # 5 slots, T < 5 blocks for early rows: padded slots
    monkeypatch.setattr(tsa.torch, "empty", nan_empty)
    out, _, _ = check_forward(x, 9, block_major=dict(combine="fused"))
    assert torch.isfinite(out).all()


def test_unknown_combine_is_named():
    x = make_case(torch.Generator().manual_seed(0), 1, 4, 1, 20, 16, 2)
    with pytest.raises(AssertionError, match="combine='merged'"):
        tsa.sparse_attention_fwd(*x.values(), BS, 8, 0.25, False, False, order="block",
                                 block_major=dict(combine="merged"))


@pytest.mark.parametrize("tc", [None, 8, 36])
@pytest.mark.parametrize("keys", ["int16", "int32"])
def test_token_lists_invert_the_selection(gen, keys, tc, monkeypatch):
    """Against a brute-force inverse, per chunk of tc tokens (None: one chunk; 8: five chunks, the last one of 5
    tokens; 36: a last chunk of one token), with the sort's keys int16 (few buckets, the default here) or int32."""
    from hysparse_compile.kernels.triton import block_major

    if keys == "int32":
        monkeypatch.setattr(block_major, "INT16_KEYS_BELOW", 0)
    idx = random_indices(2, 3, 37, 4, 3, gen)
    idx[1, 2, 10] = -1
    nb, chunk = 10, 4
    B, Hkv, T, nsel = idx.shape
    per_chunk = token_lists(idx, nb, chunk, tc)
    size = tc or T
    assert len(per_chunk) == -(-T // size)
    for c, (lists, start, item_bucket, item_chunk) in enumerate(per_chunk):
        t0, t1 = c * size, min(T, (c + 1) * size)
        for b in range(B):
            for g in range(Hkv):
                for j in range(nb):
                    k = (b * Hkv + g) * nb + j
                    got = lists[start[k]:start[k + 1]].tolist()
                    want = [(t - t0) * nsel + s for t in range(t0, t1) for s in range(nsel) if idx[b, g, t, s] == j]
                    assert got == want, (c, b, g, j)
        covered = []
        for bucket, i in zip(item_bucket.tolist(), item_chunk.tolist()):
            if bucket >= 0:
                lo = int(start[bucket]) + i * chunk
                covered += range(lo, min(int(start[bucket + 1]), lo + chunk))
        # every entry of the chunk in exactly one of its work items
        assert sorted(covered) == list(range(int(start[0]), int(start[-1])))
        assert int(start[-1]) - int(start[0]) == int((idx[:, :, t0:t1] >= 0).sum())


@pytest.mark.parametrize("nsel,G,d,max_elems", [(3, 3, 16, 32), (4, 8, 32, 1024), (5, 1, 16, 1024), (17, 2, 16, 1024),
                                                (37, 2, 16, 1000)])
def test_combine_partials_is_the_softmax_combine(gen, nsel, G, d, max_elems):
    """Slot 0 after the combine = sum_s softmax(lse)_s o_s and lse = logsumexp (log2 units), per (row, head); empty
    slots (-inf, whose outputs may hold any bits, NaN included) weigh nothing; a row with none keeps -inf and a zero
    output; other slots and rows past `rows` are left alone. max_elems 32 at d = 16 gives 2-head programs, so G = 3
    ends with a partial chunk; nsel 17 runs 32 unrolled slots, 15 of them masked; nsel 37 the chunked loop (3 steps
    of 16, the last partly masked), with a max_elems that is not a power of two."""
    op = torch.randn(2, 3, 7, nsel, G, d, generator=gen).to(DEV)
    lp = (torch.randn(2, 3, 7, nsel, G, generator=gen) * 4).to(DEV)
    lp[0, 0, 0, 1:] = float("-inf")  # one live slot
    lp[1, 1, 3, :, 0] = float("-inf")  # head 0 of a row saw no key
    op[1, 1, 3, :, 0] = float("nan")
    lp[1, 1, 5, 0] = float("-inf")  # slot 0 itself empty, its output never written
    op[1, 1, 5, 0] = float("nan")
    op0, lp0 = op.clone(), lp.clone()
    rows = 2 * 3 * 7 - 7  # the last (b, g)'s rows are not part of this call
    combine_partials(op, lp, rows, max_elems=max_elems)
    ln2 = torch.log(torch.tensor(2.0, dtype=torch.float64))
    l64 = lp0.double() * ln2  # natural log
    want_lse = torch.logsumexp(l64, dim=3) / ln2
    w = torch.softmax(l64, dim=3).nan_to_num(0.0)
    want_o = (w[..., None] * op0.double().nan_to_num(0.0)).sum(3)
    got_lse, got_o = lp[:, :, :, 0].double(), op[:, :, :, 0].double()
    done = torch.ones(2, 3, 7, dtype=torch.bool)
    done[1, 2] = False
    assert torch.equal(torch.isinf(got_lse[done]), torch.isinf(want_lse[done]))
    assert torch.isinf(got_lse[done]).sum() == 1
    fin = torch.isfinite(want_lse) & done[..., None]
    assert (got_lse[fin] - want_lse[fin]).abs().max() < 1e-5
    assert rel(got_o[done], want_o[done]) < 1e-6 and got_o[1, 1, 3, 0].abs().max() == 0
    assert torch.equal(op[1, 2], op0[1, 2]) and torch.equal(lp[1, 2], lp0[1, 2])
    assert torch.equal(op[:, :, :, 1:].nan_to_num(7.0), op0[:, :, :, 1:].nan_to_num(7.0))
    assert torch.equal(lp[:, :, :, 1:], lp0[:, :, :, 1:])


def test_merge_ignores_block_order(gen):
    """merge=True always runs token-major (documented): order="block" gives the same result."""
    x = make_case(gen, 1, 8, 2, 50, 16, 2)
    x["k_own"], x["v_own"] = x["k_shared"], x["v_shared"]
    a = tsa.sparse_attention_fwd(*x.values(), BS, 20, 0.25, True, False, order="block")[0]
    b = tsa.sparse_attention_fwd(*x.values(), BS, 20, 0.25, True, False, order="token")[0]
    assert torch.equal(a, b)


def test_auto_order_inside_a_graph_capture_reuses_the_last_measured_choice(monkeypatch):
    """No host sync while a CUDA graph is captured: the order measured on the same shape's last uncaptured call (the
    warm-up) is taken; a shape never measured gets token-major."""
    nsel = 4
    big = torch.full((1, 2, 8), 5 * nsel, dtype=torch.int32)
    monkeypatch.setattr(tsa, "LAST_ORDER", {})
    assert tsa.choose_order(big, nsel, 32768) == "block"  # warm-up, eager: measured
    monkeypatch.setattr(tsa, "capturing", lambda x: True)

    class NoSync(torch.Tensor):  # a device value read during capture would fail the capture
        def item(self):
            raise AssertionError("host sync during a graph capture")

    assert tsa.choose_order(big.as_subclass(NoSync), nsel, 32768) == "block"
    assert tsa.choose_order(torch.full((1, 2, 9), 5 * nsel, dtype=torch.int32), nsel, 36000) == "token"  # unmeasured
    assert tsa.choose_order(big, nsel, 100) == "token"  # short sequences stay token-major


def test_auto_order_rule(gen, monkeypatch):
    nsel = 4
    big = torch.full((1, 2, 8), 5 * nsel, dtype=torch.int32)  # unions 5x a token's selection: random-like
    small = torch.full((1, 2, 8), nsel + 2, dtype=torch.int32)
    assert tsa.choose_order(big, nsel, 32768) == "block"
    assert tsa.choose_order(small, nsel, 32768) == "token"
    assert tsa.choose_order(big, nsel, 100) == "token"  # short sequences stay token-major
    x = make_case(gen, 1, 4, 1, 40, 16, 2, "head")
    run = lambda **kw: tsa.sparse_attention_fwd(*x.values(), BS, 8, 0.25, False, False, **kw)[0]  # noqa: E731
    block, token = run(order="block"), run(order="token")
    monkeypatch.setattr(tsa, "AUTO_MIN_T", 0)
    monkeypatch.setattr(tsa, "AUTO_UNION_RATIO", 0.0)  # any union: block-major
    with tsa.forward_order("auto"):
        assert torch.equal(run(), block)
        assert torch.equal(run(m_tok=4), token)  # an explicit token-major knob keeps token-major
    monkeypatch.setattr(tsa, "AUTO_UNION_RATIO", 1e9)
    assert torch.equal(run(order="auto"), token)


NAMES = ("q", "k_own", "v_own", "k_shared", "v_shared", "gate_sparse", "gate_swa", "sinks")


@pytest.mark.parametrize("B,Hq,Hkv,T,gates,window", [
    (2, 8, 2, 45, "channel", 20),  # G = 4, per-channel gates, sinks, SWA
    (1, 16, 1, 37, "head", 0),  # G = 16, per-head gates, no SWA branch
])
def test_backward_through_the_op_with_block_order(gen, B, Hq, Hkv, T, gates, window):
    """Autograd through `hysparse::sparse_attention` (Triton, forward forced block-major) vs the float64 reference.
    Every reference gradient is nonzero except the own K/V's without a SWA branch, which must come back exactly 0."""
    x = make_case(gen, B, Hq, Hkv, T, 16, 3, gates)
    dout = torch.randn(B, Hq, T, 16, generator=gen).to(DEV)

    def grads(inputs, backend):
        leaves = {k: (v.detach().requires_grad_() if k in NAMES and v is not None else v) for k, v in inputs.items()}
        y = F.sparse_attention(leaves["q"], leaves["k_own"], leaves["v_own"], leaves["k_shared"], leaves["v_shared"],
                               leaves["indices"], block_size=BS, window=window or None,
                               gate_sparse=leaves["gate_sparse"], gate_swa=leaves["gate_swa"] if window else None,
                               sinks=leaves["sinks"], backend=backend)
        y.backward(dout.to(y.dtype))
        return y, {k: leaves[k].grad for k in NAMES if torch.is_tensor(leaves[k]) and leaves[k].requires_grad}

    with tsa.forward_order("block"):
        y, got = grads(x, "triton")
    r_y, ref = grads(f64(x), "reference")
    assert rel(y, r_y) < TOL
    assert set(got) == set(ref)
    for k in ref:
        if ref[k] is None:  # gate_swa without a SWA branch: not passed to the op
            assert got[k] is None, k
            continue
        g = got[k] if got[k] is not None else torch.zeros_like(ref[k])
        if window == 0 and k in ("k_own", "v_own"):  # not read: exact zeros, not a skipped check
            assert ref[k].abs().max() == 0 and g.abs().max() == 0, k
            continue
        assert ref[k].abs().max() > 0, f"{k}: the reference gradient is zero, the check would be empty"
        assert rel(g, ref[k]) < 10 * TOL, f"{k}: {rel(g, ref[k]):.2e}"


def test_int64_offsets_compute_the_same(gen, monkeypatch):
    """The block-major kernels index with int32 offsets below `INT32_OFFSETS` and int64 ones above: forced to int64,
    the forward gives the same bits and the backward the same gradients (equal under the interpreter; on a GPU the
    backward's atomics may add in another order)."""
    from hysparse_compile.kernels.triton import block_major

    x = make_case(gen, 2, 8, 2, 77, 16, 4, "channel")
    dout = torch.randn(2, 8, 77, 16, generator=gen).to(DEV)

    def run():
        leaves = {k: (v.detach().requires_grad_() if k in NAMES and v is not None else v) for k, v in x.items()}
        with tsa.forward_order("block"):
            y = F.sparse_attention(leaves["q"], leaves["k_own"], leaves["v_own"], leaves["k_shared"],
                                   leaves["v_shared"], leaves["indices"], block_size=BS, window=20,
                                   gate_sparse=leaves["gate_sparse"], gate_swa=leaves["gate_swa"],
                                   sinks=leaves["sinks"], backend="triton")
            y.backward(dout)
        return y.detach(), [leaves[k].grad for k in NAMES]

    y32, g32 = run()
    monkeypatch.setattr(block_major, "INT32_OFFSETS", 0)
    y64, g64 = run()
    assert torch.equal(y32, y64)
    for a, b in zip(g32, g64):
        assert (torch.equal(a, b) if DEV == "cpu" else rel(a, b) < 1e-5)
