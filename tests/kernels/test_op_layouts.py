"""Every backend's outputs have the layout the ops' fake implementations declare (`torch.empty_like` of the input
they stand for), so a graph compiled by Inductor, which asserts the fake layouts at run time, runs whichever backend
`auto` picks. The inputs are laid out as HF attention modules make them: q/k/v are transposed views of [B, T, H, d]
projections, the gates views of one projection."""
import os

import pytest
import torch

from hysparse_compile import functional as F

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BACKENDS = ["reference", "flex"] + (["triton"] if INTERPRET else [])


def hf_layout(B=2, T=37, Hq=4, Hkv=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, Hq, d, generator=g).transpose(1, 2)
    k, v = (torch.randn(B, T, Hkv, d, generator=g).transpose(1, 2) for _ in range(2))
    gates = torch.rand(B, T, 2, Hq, d, generator=g).permute(2, 0, 3, 1, 4)  # [2, B, Hq, T, d] views
    return q, k, v, gates[0], gates[1], torch.randn(Hq, generator=g)


def declared(x):
    return torch.empty_like(x, device="meta").stride()


@pytest.mark.parametrize("backend", BACKENDS)
def test_outputs_and_gradients_have_the_declared_layouts(backend):
    q, k, v, gs, gw, sinks = (x.requires_grad_() for x in hf_layout())
    out_f, indices = F.full_attention(q, k, v, block_size=16, topk=32, backend=backend)
    out_s = F.sparse_attention(q, k, v, k, v, indices, block_size=16, window=8, gate_sparse=gs, gate_swa=gw,
                               sinks=sinks, backend=backend)
    assert out_f.stride() == declared(q) and out_s.stride() == declared(q)
    (out_f.square().sum() + out_s.square().sum()).backward()
    for x in (q, k, v, gs, gw, sinks):
        assert x.grad.shape == x.shape


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "flex"])  # flex_attention's vmap cannot run
def test_ops_pass_opcheck_on_hf_layouts(backend):                             # inside opcheck's harness (NYI)
    """torch.library.opcheck: fake tensors (the layouts included) and autograd registration."""
    q, k, v, gs, gw, sinks = hf_layout(T=33)
    indices = torch.ops.hysparse.full_attention(q, k, v, 16, 32, 0.25, False, backend)[1]
    checks = ("test_faketensor", "test_autograd_registration")
    torch.library.opcheck(torch.ops.hysparse.full_attention.default, (q, k, v, 16, 32, 0.25, False, backend),
                          test_utils=checks)
    torch.library.opcheck(torch.ops.hysparse.sparse_attention.default,
                          (q, k, v, k, v, indices, gs, gw, sinks, 16, 8, 0.25, False, False, backend),
                          test_utils=checks)


def test_inductor_compiles_forward_and_backward_of_both_layers():
    """torch.compile with Inductor (which asserts the fake layouts of custom-op outputs) on the HF layout: the same
    values and gradients as eager."""
    q, k, v, gs, gw, sinks = hf_layout(T=40)
    backend = "triton" if INTERPRET else "reference"

    def layers(q, k, v, gs, gw, sinks):
        out, idx = F.full_attention(q, k, v, block_size=16, topk=32, backend=backend)
        y = F.sparse_attention(q, k, v, k, v, idx, block_size=16, window=8, gate_sparse=gs, gate_swa=gw,
                               sinks=sinks, backend=backend)
        return (out + y).transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)  # as before o_proj

    fast = torch.compile(layers, backend="inductor", fullgraph=True)
    got_in = [x.detach().requires_grad_() for x in (q, k, v, gs, gw, sinks)]
    want_in = [x.detach().requires_grad_() for x in (q, k, v, gs, gw, sinks)]
    got, want = fast(*got_in), layers(*want_in)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got.square().sum().backward()
    want.square().sum().backward()
    for a, b in zip(got_in, want_in):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)
