"""The ATen decompositions of both prefill ops equal the reference backend (docs/design.md), ties included, and
trace into one graph that serves every batch and length (a single block, batch 1)."""
import pytest
import torch
from torch.export import Dim

from hysparse_compile.export import decompositions as D
from hysparse_compile.kernels import reference as R


def qkv(gen, B, Hq, Hkv, T, d=16, dtype=torch.float32):
    make = lambda h: torch.randn(B, h, T, d, generator=gen).to(dtype)  # noqa: E731
    return make(Hq), make(Hkv), make(Hkv)


@pytest.mark.parametrize("B, Hq, Hkv, T", [(1, 4, 2, 1), (2, 4, 2, 16), (1, 2, 2, 17), (2, 8, 2, 77), (1, 4, 1, 130)])
def test_full_attention_matches_reference(gen, B, Hq, Hkv, T):
    q, k, v = qkv(gen, B, Hq, Hkv, T)
    got = D.full_attention(q, k, v, 16, 48, 0.3, True)
    want = R.full_attention_fwd(q, k, v, 16, 48, 0.3, True)
    assert torch.equal(got[1], want[1])  # indices: identical
    for g, w in zip((got[0], got[2], got[3]), (want[0], want[2], want[3])):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_selection_ties_go_to_the_lower_block():
    """q = 0: every visible key has the same probability, every candidate block the same score."""
    q, k, v = torch.zeros(1, 2, 70, 16), torch.randn(1, 1, 70, 16), torch.randn(1, 1, 70, 16)
    got = D.full_attention(q, k, v, 16, 32, 0.25, False)[1]
    assert got[0, 0, 69].tolist() == [0, 1]
    assert got[0, 0, 5].tolist() == [0, -1]  # one candidate block: -1 padding at the end
    assert torch.equal(got, R.full_attention_fwd(q, k, v, 16, 32, 0.25, False)[1])


def test_selection_ignores_future_blocks_and_pads_with_minus_one():
    scores = torch.tensor([[[[0.1, 0.9, 0.9, 0.0]]]]).expand(1, 1, 40, 4)  # rows = positions 0..39
    got = D.select_blocks(scores, 16, 3)
    assert got[0, 0, 15].tolist() == [0, -1, -1]  # only block 0 starts at or before t = 15
    assert got[0, 0, 16].tolist() == [0, 1, -1]
    assert got[0, 0, 39].tolist() == [0, 1, 2]


@pytest.mark.parametrize("merge, window, gates, sinks", [
    (False, 8, "element", True), (False, 8, "head", False), (False, None, "element", True), (True, 8, None, True),
    (True, None, None, False), (False, 8, None, False),
])
def test_sparse_attention_matches_reference(gen, merge, window, gates, sinks):
    B, Hq, Hkv, T, d = 2, 4, 2, 53, 16
    q, k_sh, v_sh = qkv(gen, B, Hq, Hkv, T)
    _, k_own, v_own = qkv(gen, B, Hq, Hkv, T)
    if merge:
        k_own, v_own = k_sh, v_sh
    indices = R.full_attention_fwd(q, k_sh, v_sh, 16, 32, 0.25, False)[1]
    e = {"element": d, "head": 1}.get(gates)
    gs = torch.rand(B, Hq, T, e, generator=gen) if gates else None
    gw = torch.rand(B, Hq, T, e, generator=gen) if gates and window else None
    s = torch.randn(Hq, generator=gen) if sinks else None
    args = (q, k_own, v_own, k_sh, v_sh, indices, gs, gw, s, 16, window or 0, 0.25, merge, True)
    got, want = D.sparse_attention(*args), R.sparse_attention_fwd(*args)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)  # lse, -inf where a branch saw no key


def test_decompositions_keep_q_memory_layout():
    """The ops' fake implementations return empty_like(q): code after the op may view the output accordingly."""
    q = torch.randn(2, 20, 4, 16).transpose(1, 2)  # [B, H, T, d] as a view of [B, T, H, d]
    k = torch.randn(2, 4, 20, 16)
    out = D.full_attention(q, k, k, 16, 32, 0.25, False)[0]
    assert out.stride() == torch.empty_like(q).stride()
    out.transpose(1, 2).view(2, 20, 64)  # what nanoGPT does after SDPA


class _Layer(torch.nn.Module):
    def forward(self, q, k, v, gate, sinks):
        out, indices = torch.ops.hysparse.full_attention(q, k, v, 16, 32, 0.25, False, "auto")[:2]
        y = torch.ops.hysparse.sparse_attention(q, k, v, k, v, indices, gate, None, sinks, 16, 8, 0.25, False,
                                                False, "auto")[0]
        return out, indices, y


def _layer_inputs(gen, B, T):
    q, k, v = qkv(gen, B, 4, 2, T)
    return q, k, v, torch.rand(B, 4, T, 1, generator=gen), torch.randn(4, generator=gen)


def test_run_decompositions_gives_one_graph_for_every_length(gen):
    """`ep.run_decompositions(DECOMPOSITIONS)` leaves no HySparse op, and the graph serves T = 1 (one block) to many
    blocks and batch 1 without re-tracing."""
    B, T = Dim("B", min=1), Dim("T", min=1)
    ep = torch.export.export(_Layer(), _layer_inputs(gen, 2, 40), strict=False,
                             dynamic_shapes=({0: B, 2: T}, {0: B, 2: T}, {0: B, 2: T}, {0: B, 2: T}, None))
    ep = ep.run_decompositions(D.DECOMPOSITIONS)
    assert not [n for n in ep.graph.nodes if "hysparse" in str(n.target)]
    module = ep.module()
    for b, t in ((1, 1), (1, 16), (3, 17), (2, 99)):
        x = _layer_inputs(gen, b, t)
        with torch.no_grad():
            got, want = module(*x), _Layer()(*x)
        assert torch.equal(got[1], want[1])
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-6)
