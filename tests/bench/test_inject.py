"""bench/inject.py: the sparse layers' forward and backward see the injected selections, nothing else changes."""
import pytest
import torch

from bench.bench_kernels import random_selection
from bench.inject import injected_selections
from hysparse_compile import functional as F
from hysparse_compile.kernels import ops

BS = 16


def layer(x, indices):
    return F.sparse_attention(x["q"], x["k_own"], x["v_own"], x["k_shared"], x["v_shared"], indices, block_size=BS,
                              window=8, gate_sparse=x["gs"], sinks=x["sinks"], backend="reference")


def grads(x, indices, dout):
    leaves = {k: v.detach().requires_grad_() for k, v in x.items()}
    y = layer(leaves, indices)
    y.backward(dout)
    return y.detach(), {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize("kind", ["tile", "random"])
def test_forward_and_backward_see_the_injected_selection(kind):
    g = torch.Generator().manual_seed(1)
    B, Hq, Hkv, T, d, nsel = 2, 4, 2, 150, 16, 3
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x = dict(q=r(B, Hq, T, d), k_own=r(B, Hkv, T, d), v_own=r(B, Hkv, T, d), k_shared=r(B, Hkv, T, d),
             v_shared=r(B, Hkv, T, d), gs=torch.sigmoid(r(B, Hq, T, d)), sinks=r(Hq))
    dout = r(B, Hq, T, d)
    own = random_selection(B, Hkv, T, BS, nsel, "cpu", torch.Generator().manual_seed(99))
    want_idx = random_selection(B, Hkv, T, BS, nsel, "cpu", torch.Generator().manual_seed(0),
                                tile_pool=32 if kind == "tile" else 0)
    assert not torch.equal(own, want_idx)
    real_impl = ops._impl
    with injected_selections(kind, seed=0) as injected:
        y, got = grads(x, own, dout)
    assert injected["calls"] == 2  # the forward and its backward were given the drawn indices
    (drawn,) = injected["drawn"].values()
    assert torch.equal(drawn, want_idx)
    y_own, own_grads = grads(x, own, dout)
    # against the layer's own selection, both the output and the shared K/V's gradients changed
    assert not torch.allclose(y, y_own, atol=1e-2)
    assert not torch.allclose(got["k_shared"], own_grads["k_shared"], atol=1e-2)
    assert ops._impl is real_impl  # the block restores the real implementation


def test_model_means_no_injection_and_a_bad_file_says_why(tmp_path):
    import numpy as np

    with injected_selections("model") as injected:
        pass
    assert injected == {"calls": 0, "drawn": {}}
    path = tmp_path / "sel.npz"
    np.savez(path, **{"run/layer0_indices": np.zeros((1, 10, 2), dtype=np.int16)})
    x = {k: torch.randn(1, 2, 40, 16) for k in ("q", "k_own", "v_own", "k_shared", "v_shared", "gs")}
    x["sinks"] = torch.zeros(2)
    with pytest.raises(ValueError, match="T=10, nsel=2; this row needs nsel=3 and T=40"):
        with injected_selections(str(path)):
            layer(x, random_selection(1, 2, 40, BS, 3, "cpu", torch.Generator().manual_seed(0)))
