"""The op functions: bad input gets a clear error naming the argument; torch.compile and torch.export see one node
per op."""
import pytest
import torch

from hysparse_compile import functional as F


def qkv(B=1, Hq=4, Hkv=2, T=20, d=16):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, Hq, T, d, generator=g), torch.randn(B, Hkv, T, d, generator=g),
            torch.randn(B, Hkv, T, d, generator=g))


@pytest.mark.parametrize("change, match", [
    (lambda q, k, v: (q, k[:, :1].expand(1, 3, 20, 16), k[:, :1].expand(1, 3, 20, 16)), "multiple of the KV heads"),
    (lambda q, k, v: (q, k.double(), v.double()), "dtype"),
    (lambda q, k, v: (q, k[..., :8], v[..., :8]), "k has shape"),
    (lambda q, k, v: (q, k, v[:, :, :10]), "v has shape"),
    (lambda q, k, v: (q, k[:, :, :10], v[:, :, :10]), r"k has shape \(1, 2, 10, 16\); expected \[B=1, Hkv, T=20"),
    (lambda q, k, v: (q[0], k, v), "q must have 4 dims"),
    (lambda q, k, v: (q.int(), k.int(), v.int()), "q must be float"),
])
def test_full_attention_rejects_bad_tensors(change, match):
    with pytest.raises((ValueError, TypeError), match=match):
        F.full_attention(*change(*qkv()), block_size=16, topk=16)


@pytest.mark.parametrize("kwargs, match", [
    (dict(block_size=24, topk=48), "block_size"),
    (dict(block_size=16, topk=40), "topk"),
    (dict(block_size=16, topk=16, backend="cuda"), "backend"),
    (dict(block_size=16, topk=16, scale=-1.0), "scale"),
])
def test_full_attention_rejects_bad_options(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        F.full_attention(*qkv(), **kwargs)


def test_triton_on_cpu_without_interpreter_names_a_backend_that_can(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"backend='triton'.*backends that can: reference"):
        F.full_attention(*qkv(), block_size=16, topk=16, backend="triton")


def test_sparse_attention_rejects_bad_indices_and_gates():
    q, k, v = qkv()
    _, idx = F.full_attention(q, k, v, block_size=16, topk=16)
    with pytest.raises(TypeError, match="indices must be int32"):
        F.sparse_attention(q, k, v, k, v, idx.long(), block_size=16, window=4)
    with pytest.raises(ValueError, match="indices has shape"):
        F.sparse_attention(q, k, v, k, v, idx[:, :, :5], block_size=16, window=4)
    with pytest.raises(ValueError, match="gate_sparse has shape"):
        F.sparse_attention(q, k, v, k, v, idx, block_size=16, window=4, gate_sparse=torch.full((1, 4, 20, 5), 0.3))
    with pytest.raises(ValueError, match="sinks must be"):
        F.sparse_attention(q, k, v, k, v, idx, block_size=16, window=4, sinks=torch.zeros(3))
    with pytest.raises(ValueError, match="merge=True"):
        F.sparse_attention(q, k, v, k, v, idx, block_size=16, window=4, merge=True,
                           gate_sparse=torch.full((1, 4, 20, 1), 0.3))
    with pytest.raises(ValueError, match="window"):
        F.sparse_attention(q, k, v, k, v, idx, block_size=16, window=0)
    with pytest.raises(ValueError, match="k_shared has shape"):
        F.sparse_attention(q, k, v, k[:, :, :10], v, idx, block_size=16, window=4)
    with pytest.raises(TypeError, match="save_branches must be True or False, got 1"):
        F.sparse_attention(q, k, v, k, v, idx, block_size=16, window=4, save_branches=1)


def test_decode_rejects_bad_cache_len():
    q, k, v = qkv(T=30)
    with pytest.raises(ValueError, match="cache_len values must be in 1..30"):
        F.full_attention_decode(q[:, :, :1], k, v, torch.tensor([31], dtype=torch.int32), block_size=16, topk=16)
    with pytest.raises(ValueError, match="one new token"):
        F.full_attention_decode(q[:, :, :2], k, v, torch.tensor([3], dtype=torch.int32), block_size=16, topk=16)


def test_head_gates_broadcast_from_smaller_shapes():
    q, k, v = qkv()
    _, idx = F.full_attention(q, k, v, block_size=16, topk=16)
    g = torch.rand(4, 1, 1, generator=torch.Generator().manual_seed(1))  # one gate per head, broadcast over B, T
    a = F.sparse_attention(q, k, v, k, v, idx, block_size=16, window=4, gate_sparse=g, gate_swa=g)
    b = F.sparse_attention(q, k, v, k, v, idx, block_size=16, window=4, gate_sparse=g.expand(1, 4, 20, 1),
                           gate_swa=g.expand(1, 4, 20, 1))
    assert torch.equal(a, b)


class TwoLayer(torch.nn.Module):
    def forward(self, q, k, v, sinks):
        out, idx = F.full_attention(q, k, v, block_size=16, topk=16)
        return out + F.sparse_attention(q, k, v, k, v, idx, block_size=16, window=4, sinks=sinks)


def _op_nodes(graph):
    names = [str(n.target) for n in graph.nodes if n.op == "call_function" and "hysparse" in str(n.target)]
    return [n.removesuffix(".default") for n in names]


def test_torch_export_sees_one_node_per_op():
    q, k, v = qkv()
    T = torch.export.Dim("T", min=2, max=512)
    ep = torch.export.export(TwoLayer(), (q, k, v, torch.zeros(4)),
                             dynamic_shapes=({2: T}, {2: T}, {2: T}, None))
    assert _op_nodes(ep.graph) == ["hysparse.full_attention", "hysparse.sparse_attention"]
    q2, k2, v2 = qkv(T=37)
    assert torch.allclose(ep.module()(q2, k2, v2, torch.zeros(4)), TwoLayer()(q2, k2, v2, torch.zeros(4)))


def test_torch_compile_fullgraph_runs_forward_and_backward():
    q, k, v = (x.requires_grad_() for x in qkv())
    sinks = torch.zeros(4, requires_grad=True)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(TwoLayer(), fullgraph=True, backend=backend)
    y = compiled(q, k, v, sinks)
    y.square().sum().backward()
    assert _op_nodes(graphs[0].graph).count("hysparse.full_attention") == 1
    assert _op_nodes(graphs[0].graph).count("hysparse.sparse_attention") == 1
    eager = [x.detach().requires_grad_() for x in (q, k, v, sinks)]
    TwoLayer()(*eager).square().sum().backward()
    for a, b in zip((q, k, v, sinks), eager):
        assert torch.allclose(a.grad, b.grad, atol=1e-5)


# ---------------------------------------------------------------------------------------------- index contents
def _sparse_call(idx, T=40):
    q, k, v = qkv(T=T)
    return F.sparse_attention(q, k, v, k, v, idx, block_size=16, window=4)


def _valid_indices(T=40, nsel=2):
    q, k, v = qkv(T=T)
    return F.full_attention(q, k, v, block_size=16, topk=16 * nsel)[1]


def test_indices_from_full_attention_pass_the_check():
    idx = _valid_indices(T=40, nsel=4)  # T < topk: rows end in -1 padding
    assert (idx == -1).any()
    assert _sparse_call(idx).shape == (1, 4, 40, 16)


def test_sparse_attention_rejects_a_repeated_block():
    idx = _valid_indices()
    idx[0, 1, 30] = torch.tensor([1, 1], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"indices\[0, 1, 30\] = \[1, 1\] repeats a block"):
        _sparse_call(idx)


def test_sparse_attention_rejects_unsorted_blocks():
    idx = _valid_indices()
    idx[0, 0, 35] = torch.tensor([2, 0], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"indices\[0, 0, 35\] = \[2, 0\] is not sorted: a row's blocks must ascend"):
        _sparse_call(idx)


def test_sparse_attention_rejects_padding_before_a_block():
    idx = _valid_indices()
    idx[0, 0, 35] = torch.tensor([-1, 2], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"indices\[0, 0, 35\] = \[-1, 2\] has -1 padding before a block"):
        _sparse_call(idx)


def test_sparse_attention_rejects_a_block_in_the_future_of_its_token():
    idx = _valid_indices()
    idx[0, 1, 20] = torch.tensor([0, 2], dtype=torch.int32)  # block 2 starts at 32 > 20
    with pytest.raises(ValueError, match=r"indices\[0, 1, 20, 1\] = 2 is a block in the future of its token at "
                                         r"position 20: .* j <= 1 \(block_size=16\)"):
        _sparse_call(idx)


@pytest.mark.parametrize("bad", [3, -2])
def test_sparse_attention_rejects_out_of_range_blocks(bad):
    idx = _valid_indices()
    idx[0, 0, 39, 1] = bad  # T=40: blocks 0..2
    with pytest.raises(ValueError, match=rf"indices\[0, 0, 39, 1\] = {bad} is out of range: valid entries are -1 "
                                         r"\(padding\) and block indices 0..2"):
        _sparse_call(idx)


def test_sparse_decode_rejects_a_block_after_the_row_cache_length():
    q, k, v = qkv(B=2, T=40)
    cache_len = torch.tensor([40, 20], dtype=torch.int32)  # row 1's token sits at position 19: blocks 0 and 1
    idx = torch.tensor([[[[0, 2]], [[1, 2]]], [[[0, 1]], [[1, 2]]]], dtype=torch.int32)  # [B=2, Hkv=2, 1, 2]
    with pytest.raises(ValueError, match=r"indices\[1, 1, 0, 1\] = 2 is a block in the future of its token at "
                                         r"position 19"):
        F.sparse_attention_decode(q[:, :, :1], k[:, :, :8], v[:, :, :8], k, v, idx, cache_len, block_size=16,
                                  window=4)


def test_check_indices_takes_positions_per_row():
    idx = torch.tensor([[[[0, 1]]], [[[0, 1]]]], dtype=torch.int32)  # [B=2, Hkv=1, R=1, nsel=2]
    F.check_indices(idx, torch.tensor([[20], [16]]), num_blocks=2, block_size=16)
    with pytest.raises(ValueError, match=r"indices\[1, 0, 0, 1\] = 1 is a block in the future .* position 15"):
        F.check_indices(idx, torch.tensor([[20], [15]]), num_blocks=2, block_size=16)


def test_index_checks_keep_torch_compile_fullgraph_whole():
    """The content checks read values (a host sync, a data-dependent branch): they are skipped while Dynamo traces,
    so fullgraph compilation of the decode op, which checks indices and cache_len in eager mode, succeeds."""
    q, k, v = qkv(B=2, T=40)
    cache_len = torch.tensor([40, 20], dtype=torch.int32)
    idx = torch.tensor([[[[0, 2]], [[1, 2]]], [[[0, 1]], [[1, -1]]]], dtype=torch.int32)

    def step(q, k, v, idx, cache_len):
        return F.sparse_attention_decode(q, k[:, :, :8], v[:, :, :8], k, v, idx, cache_len, block_size=16, window=4)

    got = torch.compile(step, fullgraph=True, backend="eager")(q[:, :, :1], k, v, idx, cache_len)
    assert torch.equal(got, step(q[:, :, :1], k, v, idx, cache_len))


# ---------------------------------------------------------------------------------------------- empty inputs
@pytest.mark.parametrize("shape", [(0, 4, 20, 16), (1, 4, 0, 16), (1, 4, 20, 0)], ids=["B0", "T0", "d0"])
def test_empty_inputs_are_rejected_naming_the_shape(shape):
    B, Hq, T, d = shape
    q, k = torch.zeros(B, Hq, T, d), torch.zeros(B, 2, T, d)
    with pytest.raises(ValueError, match=rf"q has shape \({B}, {Hq}, {T}, {d}\): B, Hq, T and d must all be >= 1"):
        F.full_attention(q, k, k, block_size=16, topk=16)
    idx = torch.zeros(B, 2, T, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="B, Hq, T and d must all be >= 1"):
        F.sparse_attention(q, k, k, k, k, idx, block_size=16, window=4)


def test_empty_decode_batch_is_rejected():
    q, k = torch.zeros(0, 4, 1, 16), torch.zeros(0, 2, 30, 16)
    with pytest.raises(ValueError, match=r"q has shape \(0, 4, 1, 16\)"):
        F.full_attention_decode(q, k, k, torch.zeros(0, dtype=torch.int32), block_size=16, topk=16)
