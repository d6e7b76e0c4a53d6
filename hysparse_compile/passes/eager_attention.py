"""The eager (explicit softmax) attention patterns, written as the code they match.

    # plain (Llama, Mistral, Qwen2, GPT-2, Gemma 3, ... eager):
    w = matmul(q, k.transpose(2, 3)) * scaling          # scalar mul / div, possibly on q or k instead (a pre-scale)
    w = w + mask                                         # or masked_fill / where / sub; casts and dropout allowed
    out = matmul(softmax(w, -1), v)

    # soft-capped logits (Gemma 2: attn_logit_softcapping):
    w = matmul(q, k.transpose(2, 3)) * scaling
    w = torch.tanh(w / cap) * cap
    w = w + mask
    out = matmul(softmax(w, -1), v)

    # learned per-head sinks (gpt-oss):
    w = matmul(q, k.transpose(2, 3)) * scaling + mask
    c = torch.cat([w, sinks.reshape(1, -1, 1, 1).expand(B, -1, T, -1)], dim=-1)
    c = c - c.max(dim=-1, keepdim=True).values           # a per-row shift: softmax does not see it
    out = matmul(softmax(c, -1)[..., :-1], v)            # the sink column is dropped after the softmax

`match(gm, softmax_node)` returns the pieces (or a reason it is not attention); the probe then checks numerically
that the graph computes exactly this (probe.py).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

from torch.fx import GraphModule, Node

from .graph_walk import (MATMUL, PASS_THROUGH, SCALAR_DIV, SCALAR_MUL, aten, const_value, parameter_behind,
                         shape_of)

MASK_OPS = {aten.masked_fill.Scalar, aten.masked_fill.Tensor}
ROW_MAX = {aten.max.dim, aten.amax.default}
VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}  # e.g. [B*H, T, T] -> [B, H, T, T]


@dataclass
class EagerMatch:
    scores: Node  # matmul(q, k^T)
    scale: float  # logits = softcap * tanh(scale * q.k / softcap) or scale * q.k, before the mask
    softcap: float | None
    logits: Node  # the masked logits without the sink column (what the probe compares with scale * q.k)
    sinks: Node | None  # get_attr of the per-head sink logits [Hq]
    out: Node  # matmul(probs, v)
    probs: Node  # the probabilities that multiply v (after the sink column is dropped)


@dataclass
class _Chain:
    factor: float = 1.0  # product of the scalar factors passed since the last tanh (or the softmax)
    softcap: float | None = None
    sinks: Node | None = None
    logits: Node | None = None  # set at a sink concat
    why: str = ""


def _is_row_max_of(node, x: Node) -> bool:
    """`x.max(dim=-1, keepdim=True).values` or `x.amax(-1, keepdim=True)`."""
    if isinstance(node, Node) and node.target is operator.getitem and node.args[1] == 0:
        node = node.args[0]
    return isinstance(node, Node) and node.target in ROW_MAX and node.args[0] is x


def _walk(gm: GraphModule, node, chain: _Chain, depth: int = 0) -> Node | None:
    """From the softmax input back to `matmul(q, k^T)`, recording factors, a softcap and a sink concat."""
    if not isinstance(node, Node) or node.op != "call_function" or depth > 24:
        return None
    t = node.target
    if t in MATMUL:
        return node
    if t in SCALAR_MUL:
        for a, b in ((node.args[0], node.args[1]), (node.args[1], node.args[0])):
            c = const_value(gm, b)
            if c is not None:
                chain.factor *= c
                return _walk(gm, a, chain, depth + 1)
        return None
    if t in SCALAR_DIV:
        c = const_value(gm, node.args[1])
        if not c:
            return None
        chain.factor /= c
        return _walk(gm, node.args[0], chain, depth + 1)
    if t is aten.tanh.default:
        if chain.softcap is not None:
            chain.why = "two tanh between q @ k^T and softmax"
            return None
        chain.softcap, chain.factor = chain.factor, 1.0  # cap * tanh(x / cap): the cap is what multiplies tanh
        return _walk(gm, node.args[0], chain, depth + 1)
    if t is aten.cat.default:
        parts, dim = node.args[0], node.args[1] if len(node.args) > 1 else 0
        sinks = parameter_behind(gm, parts[1]) if len(parts) == 2 else None
        if chain.sinks is not None or dim not in (-1, 3) or sinks is None or chain.factor != 1.0:
            chain.why = "a concat onto the logits that is not one column of per-head sink parameters"
            return None
        chain.sinks, chain.logits = sinks, parts[0]
        return _walk(gm, parts[0], chain, depth + 1)
    if t is aten.sub.Tensor and _is_row_max_of(node.args[1], node.args[0]):
        return _walk(gm, node.args[0], chain, depth + 1)
    if t in PASS_THROUGH or t in MASK_OPS or t in VIEWS or t is aten.sub.Tensor:
        return _walk(gm, node.args[0], chain, depth + 1)
    if t is aten.add.Tensor:
        for a in node.args[:2]:
            found = _walk(gm, a, chain, depth + 1)
            if found is not None:
                return found
    if t is aten.where.self:
        for a in node.args[1:3]:
            found = _walk(gm, a, chain, depth + 1)
            if found is not None:
                return found
    if t is aten.baddbmm.default:
        chain.why = ("the logits are baddbmm(bias, q, k^T): a bias added to q.k before the softmax (Bloom's ALiBi); "
                     "HySparse's ops compute softmax(scale * q.k) and take no position bias")
    return None


def _sink_column_dropped(node: Node) -> bool:
    """`probs[..., :-1]`: a slice of the last axis that drops its last entry."""
    if node.target is not aten.slice.Tensor:
        return False
    args = list(node.args) + [None] * (5 - len(node.args))
    _, dim, start, end, step = args[:5]
    rank = len(shape_of(node.args[0]) or ())
    return dim in (-1, rank - 1) and start in (None, 0) and end == -1 and step in (None, 1)


def _value_matmul(softmax: Node, sinks: bool) -> tuple[Node, Node] | tuple[None, None]:
    """The `matmul(probs, v)` fed by a softmax (through casts, dropout, and with sinks the slice dropping the sink
    column); returns (matmul, probs as it multiplies v)."""
    frontier, seen = [(softmax, False)], set()
    while frontier:
        n, dropped = frontier.pop()
        for user in n.users:
            if user in seen:
                continue
            seen.add(user)
            if user.op == "call_function" and user.target in MATMUL and user.args[0] is n and dropped == sinks:
                return user, n
            if user.op == "call_function" and user.target in PASS_THROUGH:
                frontier.append((user, dropped))
            elif sinks and not dropped and _sink_column_dropped(user):
                frontier.append((user, True))
    return None, None


def match(gm: GraphModule, softmax: Node) -> EagerMatch | str:
    """The eager attention pattern ending at `softmax`, or a one-line reason why it is not one."""
    chain = _Chain()
    scores = _walk(gm, softmax.args[0], chain)
    if scores is None:
        return chain.why or "not softmax(q @ k^T) @ v"
    out, probs = _value_matmul(softmax, chain.sinks is not None)
    if out is None:
        return "the probabilities do not multiply V" + (" after the sink column is dropped" if chain.sinks else "")
    return EagerMatch(scores=scores, scale=chain.factor * (chain.softcap or 1.0), softcap=chain.softcap,
                      logits=chain.logits if chain.logits is not None else softmax.args[0], sinks=chain.sinks,
                      out=out, probs=probs)
