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
        F.sparse_attention(q, k, v, k, v, idx, block_size=16, window=4, gate_sparse=torch.rand(1, 4, 20, 5))
    with pytest.raises(ValueError, match="sinks must be"):
        F.sparse_attention(q, k, v, k, v, idx, block_size=16, window=4, sinks=torch.zeros(3))
    with pytest.raises(ValueError, match="merge=True"):
        F.sparse_attention(q, k, v, k, v, idx, block_size=16, window=4, merge=True, gate_sparse=torch.rand(1, 4, 20, 1))
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
    g = torch.rand(4, 1, 1)  # one gate per head, broadcast over batch and tokens
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
