"""The paged ops: a varlen batch of a prefill from zero, a chunked-prefill piece and a decode token, with K/V in
shuffled pages of several sizes (smaller than, straddling and larger than a selection block), equals the
contiguous ops (`functional.full_attention` / `sparse_attention`, reference backend) row for row; the Triton
kernels (TRITON_INTERPRET=1 on CPU) equal the PyTorch path."""
import pytest

pytest.importorskip("vllm", reason=__import__("conftest").NO_VLLM)

import torch  # noqa: E402

from hysparse_compile.serving.vllm import paged  # noqa: E402

Hq, Hkv, D, BLOCK, NSEL, WINDOW = 4, 2, 16, 16, 2, 12
# (query rows, context length) per request: a prefill from position 0, a chunk at 30..36, one decode token at 40
REQUESTS = [(7, 7), (7, 37), (1, 41)]


def _pages(k, v, page, gen):
    """Contiguous per-request K/V [Hkv, S, d] -> shared shuffled pages [P, Hkv, page, d] and a block table [R, w]."""
    widths = [-(-kk.shape[1] // page) for kk in k]
    total = sum(widths) + 3  # a few pages nobody owns
    order = torch.randperm(total, generator=gen)
    kc = torch.randn(total, Hkv, page, D, generator=gen)  # garbage where nothing is written
    vc = torch.randn(total, Hkv, page, D, generator=gen)
    table = torch.zeros(len(k), max(widths), dtype=torch.int32)
    used = 0
    for r, (kk, vv) in enumerate(zip(k, v)):
        for p in range(widths[r]):
            blk = int(order[used])
            used += 1
            table[r, p] = blk
            chunk = slice(p * page, min((p + 1) * page, kk.shape[1]))
            n = chunk.stop - chunk.start
            kc[blk, :, :n] = kk[:, chunk]
            vc[blk, :, :n] = vv[:, chunk]
    return kc, vc, table


def _batch(gen):
    qs, ks, vs, ks2, vs2, qs2 = [], [], [], [], [], []
    for rows, seq in REQUESTS:
        qs.append(torch.randn(Hq, seq, D, generator=gen))
        qs2.append(torch.randn(Hq, seq, D, generator=gen))
        ks.append(torch.randn(Hkv, seq, D, generator=gen))
        vs.append(torch.randn(Hkv, seq, D, generator=gen))
        ks2.append(torch.randn(Hkv, seq, D, generator=gen))
        vs2.append(torch.randn(Hkv, seq, D, generator=gen))
    qsl = torch.tensor([0] + [sum(r for r, _ in REQUESTS[:i + 1]) for i in range(len(REQUESTS))], dtype=torch.int32)
    seq_lens = torch.tensor([s for _, s in REQUESTS], dtype=torch.int32)
    # each request's query rows are the last `rows` positions of its sequence
    q = torch.cat([qq[:, s - r:].transpose(0, 1) for qq, (r, s) in zip(qs, REQUESTS)])
    q2 = torch.cat([qq[:, s - r:].transpose(0, 1) for qq, (r, s) in zip(qs2, REQUESTS)])
    return dict(qs=qs, qs2=qs2, ks=ks, vs=vs, ks2=ks2, vs2=vs2, q=q, q2=q2, qsl=qsl, seq_lens=seq_lens)


def _contiguous(b, r, merge=False, window=WINDOW, sinks=None):
    """The reference backend on request r's whole sequence, rows of this step: out, indices, [sparse, swa]."""
    from hysparse_compile.kernels import reference

    rows, seq = REQUESTS[r]
    q, k, v, q2 = b["qs"][r][None], b["ks"][r][None], b["vs"][r][None], b["qs2"][r][None]
    out, idx, _, _ = reference.full_attention_fwd(q, k, v, BLOCK, NSEL * BLOCK, D ** -0.5, False)
    k_own, v_own = (k, v) if merge else (b["ks2"][r][None], b["vs2"][r][None])
    _, _, branches = reference.sparse_attention_fwd(q2, k_own, v_own, k, v, idx, None, None, sinks, BLOCK, window,
                                                    D ** -0.5, merge, True)  # [2, 1, Hq, T, d], ungated
    sl = slice(seq - rows, seq)
    return (out[0, :, sl].transpose(0, 1), idx[0, :, sl].transpose(0, 1),
            [branches[i, 0, :, sl].transpose(0, 1) for i in range(2)])


def _paged_inputs(b, page, gen, merge=False):
    kc, vc, table = _pages(b["ks"], b["vs"], page, gen)
    if merge:
        return kc, vc, table, kc, vc, table
    kw, vw, wtable = _pages(b["ks2"], b["vs2"], page, gen)
    return kc, vc, table, kw, vw, wtable


@pytest.mark.parametrize("page", [8, 24, 64])
def test_paged_full_attention_equals_the_contiguous_op_for_any_page_size(page, gen):
    b = _batch(gen)
    kc, vc, table, *_ = _paged_inputs(b, page, gen)
    out, idx = paged.paged_full_attention_torch(b["q"], kc, vc, table, b["qsl"], b["seq_lens"], BLOCK, NSEL,
                                                D ** -0.5)
    for r in range(len(REQUESTS)):
        ref_out, ref_idx, _ = _contiguous(b, r)
        rows = slice(int(b["qsl"][r]), int(b["qsl"][r + 1]))
        torch.testing.assert_close(out[rows], ref_out, rtol=1e-5, atol=1e-5)
        assert torch.equal(idx[rows], ref_idx)
    assert (idx[-1] >= 0).sum() == Hkv * NSEL  # the decode token at position 40 has 3 candidate blocks, picks 2


@pytest.mark.parametrize("page", [8, 24, 64])
@pytest.mark.parametrize("mode", ["paper", "merge", "no_swa"])
def test_paged_sparse_attention_equals_the_contiguous_op(page, mode, gen):
    b = _batch(gen)
    merge, window = mode == "merge", 0 if mode == "no_swa" else WINDOW
    sinks = None if merge else torch.randn(Hq, generator=gen)
    kc, vc, table, kw, vw, wtable = _paged_inputs(b, page, gen, merge)
    _, idx = paged.paged_full_attention_torch(b["q"], kc, vc, table, b["qsl"], b["seq_lens"], BLOCK, NSEL, D ** -0.5)
    branches = paged.paged_sparse_attention_torch(b["q2"], kc, vc, table, kw, vw, wtable, idx, b["qsl"],
                                                  b["seq_lens"], sinks, BLOCK, window, D ** -0.5, merge)
    for r in range(len(REQUESTS)):
        _, _, ref = _contiguous(b, r, merge=merge, window=window, sinks=sinks)
        rows = slice(int(b["qsl"][r]), int(b["qsl"][r + 1]))
        for i, ref_branch in enumerate(ref):
            torch.testing.assert_close(branches[rows, i], ref_branch, rtol=1e-5, atol=1e-5)
        if not window or merge:
            assert torch.count_nonzero(branches[rows, 1]) == 0


def test_apply_gates_is_the_gated_sum(gen):
    br = torch.randn(5, 2, Hq, D, generator=gen)
    g1, g2 = torch.rand(5, Hq, D, generator=gen), torch.rand(5, Hq, 1, generator=gen)
    torch.testing.assert_close(paged.apply_gates(br, g1, g2), br[:, 0] * g1 + br[:, 1] * g2)
    torch.testing.assert_close(paged.apply_gates(br, None, None), br[:, 0] + br[:, 1])


def test_write_kv_translates_slots_and_skips_padding(gen):
    kc, vc = torch.zeros(4, Hkv, 8, D), torch.zeros(4, Hkv, 8, D)
    k, v = torch.randn(3, Hkv, D, generator=gen), torch.randn(3, Hkv, D, generator=gen)
    paged.write_kv(k, v, kc, vc, torch.tensor([17, -1, 5]))
    assert torch.equal(kc[2, :, 1], k[0]) and torch.equal(vc[0, :, 5], v[2])
    assert torch.count_nonzero(kc) == 2 * Hkv * D


# ------------------------------------------------------------------------------------------ Triton (interpreter)
@pytest.fixture
def interpreted():
    import os

    if not os.environ.get("TRITON_INTERPRET") == "1" and not torch.cuda.is_available():
        pytest.skip("the Triton kernels run on CPU only under TRITON_INTERPRET=1 (set before triton is imported)")
    from hysparse_compile.serving.vllm import paged_triton

    return paged_triton


@pytest.mark.parametrize("page", [8, 24])
def test_triton_paged_full_attention_equals_the_pytorch_path(page, interpreted, gen):
    b = _batch(gen)
    kc, vc, table, *_ = _paged_inputs(b, page, gen)
    args = (b["q"], kc, vc, table, b["qsl"], b["seq_lens"], BLOCK, NSEL, D ** -0.5)
    out, idx = interpreted.paged_full_attention(*args)
    ref_out, ref_idx = paged.paged_full_attention_torch(*args)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    assert torch.equal(idx, ref_idx)


@pytest.mark.parametrize("mode", ["paper", "merge", "no_swa"])
def test_triton_paged_sparse_attention_equals_the_pytorch_path(mode, interpreted, gen):
    b = _batch(gen)
    merge, window = mode == "merge", 0 if mode == "no_swa" else WINDOW
    sinks = torch.randn(Hq, generator=gen) if mode != "no_swa" else None
    kc, vc, table, kw, vw, wtable = _paged_inputs(b, 8, gen, merge)
    _, idx = paged.paged_full_attention_torch(b["q"], kc, vc, table, b["qsl"], b["seq_lens"], BLOCK, NSEL, D ** -0.5)
    args = (b["q2"], kc, vc, table, kw, vw, wtable, idx, b["qsl"], b["seq_lens"], sinks, BLOCK, window, D ** -0.5,
            merge)
    torch.testing.assert_close(interpreted.paged_sparse_attention(*args), paged.paged_sparse_attention_torch(*args),
                               rtol=1e-5, atol=1e-5)
