"""The full layer's backward through cuDNN (`kernels/triton/full_attention_bwd_cudnn.py`).

On the CPU: which engine runs, and the error of a forced engine that cannot run; the wrapper's arguments, checked by
standing a float64 model of cuDNN's backward in for the aten op (stats = the natural-log row log-sum-exp as
`[B, H, T, 1]` float32, K/V with their own head count, dO in O's layout, no bias, dropout 0, causal): with it the
op's gradients (sinks, GQA groups 1/4/8/16, batch 2, odd T, the model's transposed layout) must equal the float64
reference's, so a wrong stats layout or base, a missing sink, a wrong scale or head mapping fails here. On CUDA: the
real cuDNN against the reference (bench/full_bwd_engines.py does it at real sizes).
"""
import os

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

import hysparse_compile.functional as F  # noqa: E402
from hysparse_compile.kernels.triton import full_attention_bwd_cudnn as engines  # noqa: E402

CUDA = torch.cuda.is_available()


def cudnn_model(dout, q, k, v, out, stats, seed, offset, bias, cum_q, cum_k, max_q, max_k, dropout, causal, *,
                scale):
    """cuDNN's SDPA backward as its contract states it, in float64; asserts the arguments it relies on."""
    B, Hq, T, d = q.shape
    assert stats.shape == (B, Hq, T, 1) and stats.dtype == torch.float32 and stats.is_contiguous()
    assert bias is None and cum_q is None and cum_k is None and dropout == 0.0 and causal is True
    assert (max_q, max_k) == (T, k.shape[2]) and dout.stride() == out.stride()
    assert seed.dtype == offset.dtype == torch.int64
    G = Hq // k.shape[1]
    q64, o64, do64 = q.double(), out.double(), dout.double()
    k64, v64 = (x.double().repeat_interleave(G, 1) for x in (k, v))
    s = q64 @ k64.transpose(-1, -2) * scale
    causal_mask = torch.ones(T, T, dtype=torch.bool).tril()
    p = torch.where(causal_mask, torch.exp(s - stats.double()), 0.0)
    dp = do64 @ v64.transpose(-1, -2)
    ds = p * (dp - (do64 * o64).sum(-1, keepdim=True))
    dq = ds @ k64 * scale
    dk = (ds.transpose(-1, -2) @ q64 * scale).view(B, -1, G, T, d).sum(2)
    dv = (p.transpose(-1, -2) @ do64).view(B, -1, G, T, d).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def leaves(B, Hq, Hkv, T, d, model_layout, sinks, dtype, seed, dev="cpu"):
    g = torch.Generator().manual_seed(seed)

    def r(h):
        x = torch.randn(B, T, h, d, generator=g).transpose(1, 2) if model_layout else torch.randn(B, h, T, d,
                                                                                                   generator=g)
        return x.to(dev, dtype)
    xs = [r(Hq), r(Hkv), r(Hkv)] + ([torch.randn(Hq, generator=g).to(dev)] if sinks else [])
    dout = torch.randn(B, Hq, T, d, generator=g).to(dev, dtype)
    return xs, dout


def grads(xs, dout, backend, dtype):
    ls = [x.detach().to(dtype if i < 3 else x.dtype).requires_grad_() for i, x in enumerate(xs)]
    out, _ = F.full_attention(*ls[:3], block_size=16, topk=32, backend=backend,
                              **({"sinks": ls[3]} if len(ls) > 3 else {}))
    out.backward(dout.to(dtype))
    return [x.grad for x in ls]


CASES = [  # B, Hq, Hkv, T, d, model layout, sinks
    (1, 4, 4, 37, 16, False, False),
    (2, 8, 2, 45, 32, True, True),
    (1, 8, 1, 70, 16, False, True),
    (1, 16, 1, 33, 16, True, False),
]


@pytest.mark.parametrize("B,Hq,Hkv,T,d,model_layout,sinks", CASES)
def test_wrapper_feeds_cudnn_what_its_backward_needs(monkeypatch, B, Hq, Hkv, T, d, model_layout, sinks):
    calls = []

    def model(*args, **kwargs):
        calls.append(1)
        return cudnn_model(*args, **kwargs)

    monkeypatch.setattr(engines, "cudnn_unsupported", lambda q, softcap: None)
    monkeypatch.setattr(engines, "_aten_cudnn_backward", model)
    xs, dout = leaves(B, Hq, Hkv, T, d, model_layout, sinks, torch.float32, seed=T)
    with engines.backward_engine("cudnn"):
        got = grads(xs, dout, "triton", torch.float32)
    ref = grads(xs, dout, "reference", torch.float64)
    assert calls == [1]
    for name, a, b in zip(("dq", "dk", "dv", "dsinks"), got, ref):
        err = ((a.double() - b).norm() / b.norm()).item()
        assert err < 1e-4, f"{name}: relative error {err:.2e}"


def test_engine_choice_and_errors(monkeypatch):
    calls = []
    monkeypatch.setattr(engines, "_aten_cudnn_backward", lambda *a, **k: calls.append(1) or cudnn_model(*a, **k))
    xs, dout = leaves(1, 4, 2, 20, 16, False, False, torch.float32, seed=1)
    if not CUDA:  # auto on the CPU: cuDNN does not apply, the Triton kernels run
        assert "device" in engines.cudnn_unsupported(xs[0], 0.0)
        grads(xs, dout, "triton", torch.float32)
        assert calls == []
        with engines.backward_engine("cudnn"), pytest.raises(ValueError, match="cannot run here: device"):
            grads(xs, dout, "triton", torch.float32)
    monkeypatch.setattr(engines, "cudnn_unsupported", lambda q, softcap: None)
    with engines.backward_engine("triton"):  # forced: never cuDNN
        grads(xs, dout, "triton", torch.float32)
    assert calls == []
    torch.use_deterministic_algorithms(True)
    try:  # auto under deterministic algorithms: the Triton kernels (cuDNN's backward is not deterministic)
        grads(xs, dout, "triton", torch.float32)
    finally:
        torch.use_deterministic_algorithms(False)
    assert calls == []
    grads(xs, dout, "triton", torch.float32)  # auto where cuDNN applies: cuDNN
    assert calls == [1]
    with pytest.raises(ValueError, match="engine='fast'; valid: 'auto', 'cudnn', 'triton'"):
        with engines.backward_engine("fast"):
            pass
    assert engines.ENGINE == "auto"


def test_a_cudnn_refusal_falls_back_to_triton_once_and_for_good(monkeypatch):
    calls = []

    def refuses(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("cuDNN Frontend error: no valid engine configs")

    monkeypatch.setattr(engines, "cudnn_unsupported", lambda q, softcap: None)
    monkeypatch.setattr(engines, "_aten_cudnn_backward", refuses)
    monkeypatch.setattr(engines, "_FAILED", {})
    xs, dout = leaves(1, 4, 2, 30, 16, False, True, torch.float32, seed=2)
    ref = grads(xs, dout, "reference", torch.float64)
    with pytest.warns(UserWarning, match="runs the Triton kernels"):
        got = grads(xs, dout, "triton", torch.float32)
    again = grads(xs, dout, "triton", torch.float32)
    assert calls == [1]  # refused once, not asked again for this device, dtype and head dim
    for a, b, c in zip(got, again, ref):
        assert ((a.double() - c).norm() / c.norm()).item() < 1e-4 and torch.equal(a, b)
    with engines.backward_engine("cudnn"), pytest.raises(RuntimeError, match="no valid engine configs"):
        grads(xs, dout, "triton", torch.float32)  # forced: cuDNN's own error, no fallback


def test_reasons_name_what_cudnn_lacks():
    q = torch.zeros(1, 2, 4, 16)
    assert "device" in engines.cudnn_unsupported(q, 0.0)
    if CUDA:
        qc = q.cuda()
        assert "dtype" in engines.cudnn_unsupported(qc, 0.0)
        assert "softcap" in engines.cudnn_unsupported(torch.zeros(1, 2, 4, 64, device="cuda").half(), 30.0)
        assert "head_dim" in engines.cudnn_unsupported(qc.half(), 0.0)


@pytest.mark.skipif(not CUDA, reason="the real cuDNN needs CUDA")
@pytest.mark.parametrize("B,Hq,Hkv,T,d,model_layout,sinks", [(2, 8, 2, 333, 64, True, True),
                                                            (1, 16, 1, 200, 128, False, False)])
def test_cudnn_against_reference(B, Hq, Hkv, T, d, model_layout, sinks):
    xs, dout = leaves(B, Hq, Hkv, T, d, model_layout, sinks, torch.float32, seed=3, dev="cuda")
    with engines.backward_engine("cudnn"):
        got = grads(xs, dout, "triton", torch.bfloat16)
    ref = grads(xs, dout, "reference", torch.float32)
    for name, a, b in zip(("dq", "dk", "dv", "dsinks"), got, ref):
        err = ((a.float() - b).norm() / b.norm()).item()
        assert err < 2e-2, f"{name}: relative error {err:.2e}"
