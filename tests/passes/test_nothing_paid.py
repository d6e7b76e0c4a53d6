"""Issue 9 item 4: the compiled graph pays for nothing the original does not need (docs/compiler.md, "What the
compiled graph does not pay for"). Each test fails on the code before the fix it names."""
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hysparse_compile import functional as F
from hysparse_compile.kernels import backends
from hysparse_compile.graph import graph_ops
from hysparse_compile.runtime import layers
from models import compiled_pair, logits

aten = torch.ops.aten
MATMULS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.matmul.default, aten.linear.default}


class _Ops(TorchDispatchMode):
    """Records every aten op with its outputs' dtypes and sizes."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        self.calls.append((func, [(o.dtype, o.numel()) for o in outs if isinstance(o, torch.Tensor)]))
        return out

    def count(self, funcs):
        return sum(f in funcs for f, _ in self.calls)


def _calls(gm, target):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


# ---------------------------------------------------------------------------------------------- gates
def test_both_gates_are_one_projection_per_sparse_layer():
    gm = compiled_pair("llama-sdpa", mode="paper", pattern="FSS")[1]._graph_module
    gates = _calls(gm, graph_ops.branch_gates)
    assert len(gates) == len(_calls(gm, layers.sparse_layer)) == 2
    for node in gates:
        weight = node.args[1]
        assert weight.op == "get_attr" and weight.target.endswith("hysparse.gate.weight")
        assert [u.target for u in weight.users] == [graph_ops.branch_gates]  # nothing else multiplies by it
        branches = [u for u in node.users]
        assert len(branches) == 2  # sparse gate and SWA gate, both from this one call
    x = torch.randn(2, 5, 8, requires_grad=True)
    with _Ops() as ops:
        sparse, swa = graph_ops.branch_gates(x, torch.randn(2 * 3 * 4, 8), heads=3, branches=2)
    assert ops.count(MATMULS) == 1  # one matmul for both gates
    assert sparse.untyped_storage().data_ptr() == swa.untyped_storage().data_ptr()  # views of its one output
    assert sparse.stride(-1) == 1  # unit last stride: the kernels read it in place (no .contiguous())


def test_gate_backward_writes_both_gradients_once():
    """`unbind` (not `g[0], g[1]`): its backward stacks the two gate gradients into one buffer; indexing would
    zero-fill a buffer of both branches for each branch and add the two."""
    x = torch.randn(2, 5, 8, requires_grad=True)
    w = torch.randn(2 * 3 * 4, 8, requires_grad=True)
    sparse, swa = graph_ops.branch_gates(x, w, heads=3, branches=2)
    with _Ops() as ops:
        torch.autograd.backward((sparse, swa), (torch.randn_like(sparse), torch.randn_like(swa)))
    names = [f.__name__ for f, _ in ops.calls]
    assert not any("select_backward" in n or n.startswith("zeros") or n.startswith("new_zeros") for n in names), names
    assert x.grad is not None and w.grad is not None


def test_bf16_model_passes_bf16_gates_and_sinks_and_makes_no_float32_gate_tensors(monkeypatch):
    """No float32 upcast the original did not make: in a bf16 model every floating tensor given to the HySparse
    ops is bf16 and nothing made by the gate computation is float32."""
    _, compiled = compiled_pair("llama-sdpa", mode="paper")
    import copy

    model = copy.deepcopy(compiled).to(torch.bfloat16)
    seen = {}
    real_sparse, real_gates = F.sparse_attention, graph_ops.branch_gates

    def sparse(*args, **kwargs):
        for i, a in enumerate(list(args) + list(kwargs.values())):
            if isinstance(a, torch.Tensor) and a.is_floating_point():
                seen[i] = a.dtype
        return real_sparse(*args, **kwargs)

    gate_dtypes = []

    def gates(*args, **kwargs):
        with _Ops() as ops:
            out = real_gates(*args, **kwargs)
        gate_dtypes.extend(d for _, outs in ops.calls for d, _ in outs)
        return out

    monkeypatch.setattr(F, "sparse_attention", sparse)
    for node in _calls(model._graph_module, real_gates):  # the graph calls branch_gates by reference
        node.target = gates
    model._graph_module.recompile()
    ids = torch.randint(1, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    assert logits(model(ids)).dtype == torch.bfloat16
    assert len(seen) >= 7 and set(seen.values()) == {torch.bfloat16}  # q, k/v x4, both gates, sinks
    assert gate_dtypes and set(gate_dtypes) == {torch.bfloat16}


# ---------------------------------------------------------------------------------------------- copies
class _Recorder:
    """A backend module that forwards to the reference and records what the backward ops receive."""

    def __init__(self, seen):
        self._ref, self._seen = backends.load("reference"), seen

    def __getattr__(self, name):
        attr = getattr(self._ref, name)
        if name.endswith("_bwd"):
            def bwd(dout, *rest):
                self._seen.append((name, dout.is_contiguous(), rest))
                return attr(dout, *rest)
            return bwd
        return attr


def test_backward_ops_pass_dout_with_its_strides_no_copy(monkeypatch):
    """The attention output goes through transpose + reshape into o_proj, so its gradient arrives as a transposed
    view; the backends read strides (the Triton full kernel does), so the op must not copy it first."""
    seen = []
    real = backends.resolve
    monkeypatch.setattr(backends, "resolve", lambda name, op, **meta: _Recorder(seen) if name == "reference"
                        else real(name, op, **meta))
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, T, d = 1, 4, 2, 40, 16
    q = torch.randn(B, T, Hq, d, generator=g).transpose(1, 2).requires_grad_()  # [B, Hq, T, d] as models lay it
    k, v = (torch.randn(B, T, Hkv, d, generator=g).transpose(1, 2).requires_grad_() for _ in range(2))
    out, idx = F.full_attention(q, k, v, block_size=16, topk=32, backend="reference")
    y = F.sparse_attention(q, k, v, k, v, idx, block_size=16, window=8, sinks=torch.zeros(Hq), backend="reference")
    w = torch.randn(Hq * d, 8, generator=g)
    loss = ((out + y).transpose(1, 2).reshape(B, T, Hq * d) @ w).sum()
    loss.backward()
    kinds = {name: contiguous for name, contiguous, _ in seen}
    assert kinds == {"full_attention_bwd": False, "sparse_attention_bwd": False}, kinds


def test_sparse_op_does_not_keep_its_output_for_backward():
    """No backend's sparse backward reads `out` (the gate gradients need each branch's output): keeping it would
    hold one more [B, Hq, T, d] tensor per sparse layer until the backward."""
    g = torch.Generator().manual_seed(1)
    B, Hq, Hkv, T, d = 1, 4, 2, 40, 16
    q = torch.randn(B, Hq, T, d, generator=g, requires_grad=True)
    k, v = (torch.randn(B, Hkv, T, d, generator=g, requires_grad=True) for _ in range(2))
    _, idx = F.full_attention(q, k, v, block_size=16, topk=32, backend="reference")
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = F.sparse_attention(q, k, v, k, v, idx, block_size=16, window=8, sinks=torch.zeros(Hq, requires_grad=True),
                               backend="reference")
    assert saved and not any(s.numel() and s.untyped_storage().data_ptr() == y.untyped_storage().data_ptr()
                             for s in saved)
    y.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="needs the Triton interpreter or a GPU")
def test_triton_full_backward_makes_no_float32_copies_of_dout_and_out():
    """delta = rowsum(dO * O) in a small kernel, not `(dout.float() * out.float()).sum(-1)` (two fp32 copies of
    [B, Hq, T, d] and their product, per full layer)."""
    from hysparse_compile.kernels import reference
    from hysparse_compile.kernels.triton.full_attention import full_attention_bwd

    dev = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    g = torch.Generator().manual_seed(2)
    B, Hq, Hkv, T, d = 1, 4, 2, 32, 16
    q = torch.randn(B, Hq, T, d, generator=g).to(dev, torch.float16)
    k, v = (torch.randn(B, Hkv, T, d, generator=g).to(dev, torch.float16) for _ in range(2))
    out, _, lse, _ = reference.full_attention_fwd(q, k, v, 16, 32, d ** -0.5, False)
    dout = torch.randn(B, T, Hq, d, generator=g).to(dev, torch.float16).transpose(1, 2)
    with _Ops() as ops:
        dq, dk, dv = full_attention_bwd(dout, q, k, v, out, lse, d ** -0.5)
    big_fp32 = [f for f, outs in ops.calls for dt, n in outs if dt == torch.float32 and n >= dout.numel()]
    assert not big_fp32, big_fp32
    ref = reference.full_attention_bwd(dout.float(), q.float(), k.float(), v.float(), out.float(), lse, d ** -0.5)
    for a, b in zip((dq, dk, dv), ref):
        assert (a.float() - b).abs().max() <= 2e-2 * b.abs().max()


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="needs the Triton interpreter or a GPU")
def test_triton_full_layer_output_keeps_q_layout_so_the_reshape_before_o_proj_is_a_view():
    """q/k/v come from the projections as [B, T, H, d]-major views; the full layer reads them in place and writes its
    output in q's layout, so `out.transpose(1, 2).reshape(B, T, -1)` (every HF model's step before o_proj) copies
    nothing, as after SDPA's flash / cuDNN kernels."""
    from hysparse_compile.kernels.triton.full_attention import full_attention_fwd

    dev = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    g = torch.Generator().manual_seed(3)
    B, Hq, Hkv, T, d = 1, 4, 2, 48, 16
    q = torch.randn(B, T, Hq, d, generator=g).to(dev).transpose(1, 2)
    k, v = (torch.randn(B, T, Hkv, d, generator=g).to(dev).transpose(1, 2) for _ in range(2))
    with _Ops() as ops:
        out, idx, _, _ = full_attention_fwd(q, k, v, 16, 32, d ** -0.5, False)
    assert not [f for f, _ in ops.calls if f in (aten.clone.default, aten.contiguous.default)]  # no K/V copies
    assert out.stride() == q.stride()
    flat = out.transpose(1, 2).reshape(B, T, Hq * d)
    assert flat.data_ptr() == out.data_ptr() and flat._base is not None  # a view, not a copy


def _saved_activation_bytes(model, ids) -> int:
    """Bytes of the distinct storages autograd keeps for backward (parameters excluded) in one forward."""
    return sum(_saved_storages(model, ids)[0].values())


def _saved_storages(model, ids, call=None):
    """({storage pointer: bytes} of what autograd keeps for backward in one forward, parameters excluded; the
    logits). `call`: what runs the forward (default `model`; e.g. its torch.compile)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = logits((model if call is None else call)(ids))
    return storages, out


def test_compiled_training_keeps_each_sparse_layers_gates_once():
    """Under torch.compile (Inductor) with grad, a sparse layer keeps one [B, T, 2 Hq d] gate tensor, as eager
    autograd does: with a plain sigmoid, Inductor also kept the gate projection's output to recompute the sigmoid in
    the backward (graph_ops.gate_sigmoid). The compiled step's gradients equal the eager step's."""
    import transformers as tf
    from models import _hf_common

    import hysparse_compile as hs

    torch.manual_seed(0)  # head_dim 32 with 4 heads: 2 Hq d = 256, a width no other activation of the model has
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**_hf_common(3, 4, 2), head_dim=32, attn_implementation="sdpa"))
    compiled = hs.compile(model, hs.Schedule.from_pattern("FSS", block_size=16, topk=32, window=16, mode="paper"))
    B, T = 1, 40
    ids = torch.randint(0, 100, (B, T), generator=torch.Generator().manual_seed(5))
    gate_bytes = B * T * 2 * 4 * 32 * 4  # fp32
    params = [p for p in compiled.parameters() if p.requires_grad]
    kept, grads = {}, {}
    for how, call in (("eager", None), ("inductor", torch.compile(compiled, backend="inductor", dynamic=False))):
        storages, out = _saved_storages(compiled, ids, call)
        kept[how] = sorted(storages.values()).count(gate_bytes)
        out.sum().backward()
        grads[how] = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
    assert kept == {"eager": 2, "inductor": 2}, kept  # one per sparse layer (Inductor kept 4 before)
    for a, b in zip(grads["eager"], grads["inductor"]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("save_branches", [False, True])
def test_sparse_layers_keep_only_their_gates_unless_branches_are_saved(save_branches, train_mode):
    """Training memory: by default a sparse layer adds only its gate activations to what the original keeps (the
    branch outputs are recomputed in the backward, as SDPA recomputes its probabilities); save_branches=True also
    keeps the two ungated branch outputs, [2, B, Hq, T, d]."""
    options = {"save_branches": True} if save_branches else {}
    model, compiled = compiled_pair("llama-sdpa", mode="paper", pattern="FSSS", **options)
    B, T = 2, 48
    ids = torch.randint(0, 100, (B, T), generator=torch.Generator().manual_seed(5))
    cfg = model.config
    q_bytes = B * T * cfg.num_attention_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4  # fp32 model
    n_sparse = 3
    extra = _saved_activation_bytes(compiled, ids) - _saved_activation_bytes(model, ids)
    gates = n_sparse * 2 * q_bytes  # per-channel sparse and SWA gates
    if save_branches:
        assert extra >= gates + n_sparse * 2 * q_bytes, extra
    else:
        assert gates <= extra < gates + n_sparse * q_bytes // 2, (extra, gates, q_bytes)
    train_mode(compiled)  # shared models: the fixture restores eval mode even if the test fails
    out = compiled(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in compiled.named_parameters() if p.grad is not None}
    compiled.zero_grad()
    _, other = compiled_pair("llama-sdpa", mode="paper", pattern="FSSS",
                             **({} if save_branches else {"save_branches": True}))
    train_mode(other)
    other(input_ids=ids, labels=ids).loss.backward()
    for n, p in other.named_parameters():
        if n in grads:
            assert torch.allclose(p.grad, grads[n], rtol=1e-5, atol=1e-7), n
    other.zero_grad()

