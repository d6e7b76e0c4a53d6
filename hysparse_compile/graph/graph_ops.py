"""Small graph-friendly functions the rewrite inserts around the HySparse ops (plain torch: they export, compile
and differentiate like any other code).

Padding (docs/design.md "Padding"): a left-padded row becomes right-padded before each op (`roll_rows` by the row's
count of leading pads) and the output is rolled back (`unroll_rows`), so causality keeps real tokens away from pads
and block boundaries match the unpadded row. The graph passes the model's call in progress (`call`, a
`runtime.state.CallState`): when it is known to carry no padding the rolls are the identity and are skipped.
"""
from __future__ import annotations

import torch
from torch import Tensor


def left_pad_shift(attention_mask: Tensor) -> Tensor:
    """attention_mask [B, T] (1 = token, 0 = pad) -> int64 [B]: the number of leading pads of each row."""
    return (attention_mask.cumsum(-1) == 0).sum(-1)


def _row_index(x: Tensor, shift: Tensor, dim: int, sign: int) -> Tensor:
    T = x.shape[dim]
    idx = (torch.arange(T, device=x.device)[None, :] + sign * shift[:, None]) % T  # [B, T]
    shape = [x.shape[0]] + [1] * (x.dim() - 1)
    shape[dim] = T
    return idx.view(shape).expand_as(x)


def roll_rows(x: Tensor, shift: Tensor, dim: int = 2, call=None) -> Tensor:
    """x [B, ..., T (at dim), ...] -> row b rolled left by shift[b]: out[b, ..., t] = x[b, ..., (t + shift[b]) % T].
    call: the model's `CallState` (the roll is skipped when the call is padding-free)."""
    if call is not None and call.padding_free():  # the roll is the identity: skip its gathers
        return x
    return torch.gather(x, dim, _row_index(x, shift, dim, 1))


def unroll_rows(x: Tensor, shift: Tensor, dim: int = 2, call=None) -> Tensor:
    """The inverse of `roll_rows`: out[b, ..., t] = x[b, ..., (t - shift[b]) % T]."""
    if call is not None and call.padding_free():  # the roll is the identity: skip its gathers
        return x
    return torch.gather(x, dim, _row_index(x, shift, dim, -1))


def branch_gates(x: Tensor, weight: Tensor, heads: int, branches: int) -> tuple[Tensor, ...]:
    """Gates of a sparse layer from its input hidden state (docs/compiler.md: g~, g' = sigmoid(W x_t)).

    x [B, T, hidden] (or [B*T, hidden] with T taken from the weight's use); weight [branches * heads * e, hidden]
    with e = head_dim (gate="element") or 1 (gate="head") -> `branches` tensors [B, heads, T, e]: the sparse-branch
    gate first, then the SWA-branch gate.

    Both gates come from one matmul and one sigmoid, in x's dtype; they are strided views of that one output (the
    kernels take gates with any strides), split by `unbind`, whose backward writes both gate gradients into one
    buffer (indexing `g[i]` would zero-fill a buffer of both branches per branch and add them: docs/compiler.md,
    "What the compiled graph does not pay for").
    """
    logits = torch.nn.functional.linear(x, weight)  # [B, T, branches * heads * e]
    trains = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    compiling = torch.compiler.is_compiling() and not exporting()
    g = gate_sigmoid(logits) if trains and compiling else torch.sigmoid(logits)
    B, T = x.shape[0], x.shape[1]
    g = g.view(B, T, branches, heads, -1).permute(2, 0, 3, 1, 4)  # [branches, B, heads, T, e]
    return g.unbind(0)


def exporting() -> bool:
    """Whether torch.export is tracing. torch 2.11's Dynamo folds `torch.compiler.is_exporting()` to True under any
    `torch.compile` (torch 2.13's reads the flag torch.export sets; measured on the GPU, 2026-12-06: with it, the
    gates never took `gate_sigmoid` there), so the flag is read here directly where it exists."""
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    return torch.compiler.is_exporting() if flag is None else bool(flag)


@torch.library.custom_op("hysparse::gate_sigmoid", mutates_args=())
def gate_sigmoid(logits: Tensor) -> Tensor:
    """`torch.sigmoid` that Inductor cannot take apart, for the gates of a graph being compiled for training.

    The sparse op's backward needs the gates (the sigmoid's output), and the sigmoid's own backward needs them too.
    With a plain sigmoid, Inductor's partitioner saves the projection's output to recompute the sigmoid in the
    backward *and* the gates the sparse op holds: two `[B, T, 2 Hq e]` tensors per sparse layer where one serves
    (docs/compiler.md "What the compiled graph does not pay for"). As an opaque op whose backward reads its output,
    only the gates are kept. Eager autograd keeps one already; `torch.export` sees `torch.sigmoid`."""
    return torch.sigmoid(logits)


@gate_sigmoid.register_fake
def _(logits):
    return torch.empty_like(logits)


def _gate_sigmoid_setup(ctx, inputs, output):
    ctx.save_for_backward(output)


def _gate_sigmoid_backward(ctx, grad):
    (g,) = ctx.saved_tensors
    return torch.ops.aten.sigmoid_backward(grad, g)


gate_sigmoid.register_autograd(_gate_sigmoid_backward, setup_context=_gate_sigmoid_setup)


def select_nothing(indices: Tensor) -> Tensor:
    """int32 [B, Hkv, R, nsel] -> [B, Hkv, R, 1] of -1: no block selected (a full layer with topk=0; the ops take at
    least one column and skip -1 entries, so the sparse layers reading it attend to their window alone)."""
    return torch.full_like(indices[..., :1], -1)


def window_only_indices(q: Tensor, kv_heads: int) -> Tensor:
    """q [B, Hq, R, d] -> int32 [B, Hkv, R, 1] of -1: a window-only (`W`) layer has no full layer selecting for it."""
    return torch.full((q.shape[0], kv_heads, q.shape[2], 1), -1, dtype=torch.int32, device=q.device)
