"""The token-major sparse-layer forward with K/V blocks through tensor descriptors (`tma=True`) against the float64
reference and the pointer kernel: GQA groups 1/4/16, batch 2, odd T, per-channel and per-head gates, sinks, no
window, the merged softmax, softcap, the model's transposed layout. Runs on CUDA, or on CPU under TRITON_INTERPRET=1
(the interpreter implements tensor descriptors, zero-filling rows past the tensor as the bulk copy does)."""

import os
import warnings

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from oracle import random_indices  # noqa: E402

from hysparse_compile.kernels import reference  # noqa: E402
from hysparse_compile.kernels.triton import common  # noqa: E402
from hysparse_compile.kernels.triton import sparse_attention as tsa  # noqa: E402

pytestmark = pytest.mark.skipif(common.TensorDescriptor is None, reason="this Triton has no tensor descriptors")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
BS = 16
TOL = 1e-5 if DEV == "cpu" else 3e-3  # on a GPU, tl.dot rounds float32 inputs to TF32


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def case(seed, B, Hq, Hkv, T, d, nsel, gates, sinks, transposed):
    gen = torch.Generator().manual_seed(seed)

    def r(h):
        if transposed:  # [B, T, H, d] memory viewed as [B, H, T, d], as the compiled model passes it
            return torch.randn(B, T, h, d, generator=gen).to(DEV).transpose(1, 2)
        return torch.randn(B, h, T, d, generator=gen).to(DEV)
    x = dict(q=r(Hq), k_own=r(Hkv), v_own=r(Hkv), k_shared=r(Hkv), v_shared=r(Hkv),
             indices=random_indices(B, Hkv, T, BS, nsel, gen).to(DEV), gate_sparse=None, gate_swa=None,
             sinks=torch.randn(Hq, generator=gen).to(DEV) if sinks else None)
    if gates == "head":
        x["gate_sparse"], x["gate_swa"] = (torch.rand(B, Hq, T, 1, generator=gen).to(DEV) for _ in range(2))
    elif gates == "channel":  # non-contiguous slices of one [B, T, Hq, 2d] projection
        both = torch.rand(B, T, Hq, 2 * d, generator=gen).to(DEV)
        x["gate_sparse"], x["gate_swa"] = both[..., :d].transpose(1, 2), both[..., d:].transpose(1, 2)
    return x


CASES = {  # name: (B, Hq, Hkv, T, d, nsel, gates, sinks, window, merge, softcap, transposed)
    "g1_b2_T45": (2, 2, 2, 45, 16, 3, None, True, 20, False, 0.0, False),
    "g4_T77_channel_model_layout": (2, 8, 2, 77, 32, 4, "channel", True, 24, False, 0.0, True),
    "g16_T45_head_nowindow": (1, 16, 1, 45, 16, 3, "head", False, 0, False, 0.0, False),
    "g4_T50_merge": (1, 8, 2, 50, 16, 3, None, True, 20, True, 0.0, False),  # merge: gates are rejected
    "g4_T33_softcap": (2, 4, 1, 33, 16, 2, None, True, 12, False, 4.0, False),
}


# 4-D descriptors (by default on the model's layout only; every case with --full) and 2-D (contiguous: mode 2, the
# model's layout: mode 3)
GRID = [pytest.param(n, True, marks=[] if n == "g4_T77_channel_model_layout" else pytest.mark.full_grid)
        for n in CASES] + [(n, "2d") for n in CASES]


@pytest.mark.parametrize("name,tma", GRID)
def test_descriptor_loads_match_reference_and_pointer_kernel(monkeypatch, name, tma):
    B, Hq, Hkv, T, d, nsel, gates, sinks, window, merge, cap, transposed = CASES[name]
    x = case(len(name), B, Hq, Hkv, T, d, nsel, gates, sinks, transposed)
    if merge:  # one softmax over the selected and window keys of the layer's own K/V, passed as the shared ones
        x["k_own"], x["v_own"] = x["k_shared"], x["v_shared"]
    monkeypatch.setattr(tsa, "TMA_FAILED", {})
    args = (*x.values(), BS, window, d ** -0.5, merge, True)
    got = tsa.sparse_attention_fwd(*args, order="token", softcap=cap, tma=tma)
    assert not tsa.TMA_FAILED, tsa.TMA_FAILED
    assert common.tma_mode(tma, x["k_shared"], x["k_own"]) == (1 if tma is True else 3 if transposed else 2)
    base = tsa.sparse_attention_fwd(*args, order="token", softcap=cap, tma=False)
    f64 = [v.double() if torch.is_tensor(v) and v.is_floating_point() else v for v in x.values()]
    ref = reference.sparse_attention_fwd(*f64, BS, window, d ** -0.5, merge, True, softcap=cap)
    assert rel(got[0], ref[0]) < TOL and rel(got[2], ref[2]) < TOL
    fin = torch.isfinite(ref[1])
    assert torch.equal(torch.isinf(got[1]), torch.isinf(ref[1]))
    assert (got[1][fin].double() - ref[1][fin]).abs().max() < 1e-4
    assert rel(got[0], base[0]) < 1e-6 and torch.equal(torch.isinf(got[1]), torch.isinf(base[1]))


def test_descriptor_failure_falls_back_once(monkeypatch):
    def refuse(*a, **k):
        raise RuntimeError("no bulk copies")

    x = case(1, 1, 4, 1, 40, 16, 2, None, True, False)
    args = (*x.values(), BS, 8, 0.25, False, False)
    base = tsa.sparse_attention_fwd(*args, order="token", tma=False)[0]
    monkeypatch.setattr(tsa, "TMA_FAILED", {})
    monkeypatch.setattr(common, "TensorDescriptor", refuse)
    with pytest.warns(RuntimeWarning, match="token-major forward with tensor descriptors failed"):
        out = tsa.sparse_attention_fwd(*args, order="token", tma=True)[0]
    assert torch.equal(out, base) and list(tsa.TMA_FAILED.values()) == ["RuntimeError: no bulk copies"]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert torch.equal(tsa.sparse_attention_fwd(*args, order="token", tma=True)[0], base)
    assert not [w for w in seen if "hysparse" in str(w.message)], "remembered: no second try, no second warning"


def test_misaligned_kv_keeps_pointer_loads(monkeypatch):
    """K/V whose rows are not 16-byte multiples apart cannot be described: the pointer kernel runs, no warning."""
    x = case(2, 1, 4, 1, 40, 16, 2, None, True, False)
    x = {k: (v.half() if torch.is_tensor(v) and v.is_floating_point() and k != "sinks" else v) for k, v in x.items()}
    wide = torch.randn(1, 1, 40, 20, device=DEV).half()
    wide[..., :16] = x["k_shared"]
    x["k_shared"] = wide[..., :16]  # rows 40 bytes apart
    assert not common.tma_ok(x["k_shared"])
    monkeypatch.setattr(tsa, "TMA_FAILED", {})
    monkeypatch.setattr(tsa, "descriptor", None)  # would fail if it were called
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = tsa.sparse_attention_fwd(*x.values(), BS, 8, 0.25, False, False, order="token", tma=True)[0]
    assert torch.isfinite(out).all() and not tsa.TMA_FAILED
    assert not [w for w in seen if "hysparse" in str(w.message)]


def test_2d_descriptors_keep_a_nan_in_the_next_head_out():
    """With 2-D descriptors the last block of KV head 0 (T not a multiple of the block) runs on into head 1's rows:
    a NaN there must not reach head 0's outputs (the pointer kernel's masked loads never read it)."""
    x = case(5, 2, 8, 2, 45, 16, 3, None, True, False)  # contiguous: mode 2
    for n in ("k_shared", "v_shared", "k_own", "v_own"):
        x[n][:, 1] = float("nan")
    args = (*x.values(), BS, 20, 0.25, False, False)
    got = tsa.sparse_attention_fwd(*args, order="token", tma="2d")[0]
    base = tsa.sparse_attention_fwd(*args, order="token", tma=False)[0]
    assert torch.isfinite(got[:, :4]).all() and torch.equal(got[:, :4], base[:, :4])  # query heads of KV head 0


def test_the_default_takes_descriptors_only_where_they_were_timed(monkeypatch):
    """TOKEN_TMA applies at the (block, head dim) where it was timed; elsewhere pointer loads, the default before."""
    monkeypatch.setattr(tsa, "TOKEN_TMA", True)
    monkeypatch.setattr(tsa, "TOKEN_TMA_TIMED", {(64, 128)})
    assert tsa.token_tma(64, 128) is True and tsa.token_tma(64, 64) is False and tsa.token_tma(16, 128) is False
    monkeypatch.setattr(tsa, "TOKEN_TMA_TIMED", None)
    assert tsa.token_tma(16, 16) is True

