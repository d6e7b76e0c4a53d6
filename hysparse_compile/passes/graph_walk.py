"""Walking a captured graph: the op sets the attention patterns are written in, constants behind scalar arguments,
and the walks back from an attention call to its q/k/v tensors and to the hidden state that feeds the projections.

Used by `find_attention` (the site driver) and `eager_attention` (the softmax patterns).
"""
from __future__ import annotations

import math

import torch
from torch.fx import GraphModule, Node

aten = torch.ops.aten

LAYOUT_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default,
              aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.clone.default,
              aten.contiguous.default, aten.alias.default, aten.repeat_interleave.self_int, aten.transpose.int,
              aten.permute.default}
TRANSPOSES = {aten.t.default, aten.numpy_T.default, aten.transpose.int, aten.permute.default}
SCALAR_MUL = {aten.mul.Tensor, aten.mul.Scalar}
SCALAR_DIV = {aten.div.Tensor, aten.div.Scalar}
SDPA = {aten.scaled_dot_product_attention.default}
SOFTMAX = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
MATMUL = {aten.matmul.default, aten.bmm.default}
PASS_THROUGH = {aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.type_as.default,
                aten.dropout.default, aten.clone.default, aten.contiguous.default, aten.alias.default}
PROJECTIONS = {aten.linear.default: (0, 1), aten.addmm.default: (1, 2), aten.mm.default: (0, 1),
               aten.matmul.default: (0, 1)}  # op -> (activation arg, weight arg)


def module_path(node: Node) -> str:
    """The innermost module a node ran in, e.g. "model.layers.3.self_attn" ("" when export recorded none)."""
    stack = node.meta.get("nn_module_stack") or {}
    paths = [v[0] for v in stack.values() if isinstance(v, tuple) and v and isinstance(v[0], str)]
    return paths[-1] if paths else ""


def shape_of(node) -> tuple | None:
    val = node.meta.get("val") if isinstance(node, Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def attr_of(gm: GraphModule, node: Node):
    """The tensor a get_attr node reads (None when it is not one)."""
    if not isinstance(node, Node) or node.op != "get_attr":
        return None
    t = gm
    for part in node.target.split("."):
        t = getattr(t, part, None)
    return t


def const_value(gm: GraphModule, x):
    """The Python number behind a scalar argument (a literal, torch.full([]) / scalar_tensor, a 0-d constant), or
    None when it is not a constant."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x)
    if not isinstance(x, Node):
        return None
    if x.op == "get_attr":
        t = attr_of(gm, x)
        learned = isinstance(t, torch.nn.Parameter) or getattr(t, "requires_grad", False)  # trained: not a constant
        return float(t.item()) if isinstance(t, torch.Tensor) and t.numel() == 1 and not learned else None
    if x.op != "call_function":
        return None
    if x.target is aten.full.default and not list(x.args[0]):
        return const_value(gm, x.args[1])
    if x.target is aten.scalar_tensor.default:
        return const_value(gm, x.args[0])
    if x.target in PASS_THROUGH or x.target is aten.lift_fresh_copy.default:
        return const_value(gm, x.args[0])
    if x.target is aten.sqrt.default:
        c = const_value(gm, x.args[0])
        return math.sqrt(c) if c is not None else None
    if x.target is aten.reciprocal.default:
        c = const_value(gm, x.args[0])
        return 1.0 / c if c else None
    return None


def same_dim(a, b) -> bool:
    """Size equality without guarding: symbolic sizes compare by expression, never equal to a plain int."""
    if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt):
        return isinstance(a, torch.SymInt) and isinstance(b, torch.SymInt) and a.node.expr == b.node.expr
    return a == b


def is_qkv_shape(shape, B, T, d) -> bool:
    return (shape is not None and len(shape) == 4 and same_dim(shape[0], B) and same_dim(shape[2], T)
            and same_dim(shape[3], d))


def full_slice(node: Node) -> bool:
    """`x[:, :, None]`-style indexing records a slice that keeps the whole axis; it is a layout op."""
    if node.target is not aten.slice.Tensor:
        return False
    args = list(node.args) + [None] * (5 - len(node.args))
    _, dim, start, end, step = args[:5]
    size = shape_of(node.args[0])[dim or 0] if shape_of(node.args[0]) is not None else None
    return (start in (None, 0) and (end is None or end >= 2**62 or (isinstance(end, int) and end == size))
            and step in (None, 1))


def peel(gm: GraphModule, node: Node, B, T, d) -> tuple[Node, float]:
    """Walk back from a q/k/v argument through layout ops and scalar multiplies; returns the earliest node of shape
    [B, h, T, d] on that chain and the scalar factor between it and the argument."""
    best, factor, best_factor = node, 1.0, 1.0
    cur = node
    for _ in range(32):
        if is_qkv_shape(shape_of(cur), B, T, d):
            best, best_factor = cur, factor
        if cur.op != "call_function":
            break
        if cur.target in LAYOUT_OPS or full_slice(cur):
            cur = cur.args[0]
        elif cur.target in SCALAR_MUL and const_value(gm, cur.args[1]) is not None:
            factor *= const_value(gm, cur.args[1])
            cur = cur.args[0]
        elif cur.target in SCALAR_MUL and const_value(gm, cur.args[0]) is not None:
            factor *= const_value(gm, cur.args[0])
            cur = cur.args[1]
        elif cur.target in SCALAR_DIV and const_value(gm, cur.args[1]):
            factor /= const_value(gm, cur.args[1])
            cur = cur.args[0]
        else:
            break
        if not isinstance(cur, Node):
            break
    return best, best_factor


def parameter_behind(gm: GraphModule, node) -> Node | None:
    """The get_attr of a parameter reached from `node` through layout ops and transposes (`weight.T`, `weight.t()`,
    a reshape / expand of a per-head vector), or None."""
    cur = node
    for _ in range(8):
        if not isinstance(cur, Node):
            return None
        if cur.op == "get_attr":
            return cur if isinstance(attr_of(gm, cur), torch.Tensor) else None
        if cur.op == "call_function" and (cur.target in LAYOUT_OPS or cur.target in TRANSPOSES
                                          or cur.target in PASS_THROUGH):
            cur = cur.args[0]
        else:
            return None
    return None


def gate_input(gm: GraphModule, node: Node, B, T) -> tuple[Node | None, int | None]:
    """The activation of the nearest projection upstream of q (breadth first), as [B, T, hidden] when it can be
    recovered, else (None, None). A projection is `linear(x, W)`, `addmm(b, x, W)`, `mm(x, W)` or `matmul(x, W)`
    with W a weight, possibly transposed (`x @ self.weight.T`: Falcon's fused QKV)."""
    frontier, seen = [node], {node}
    while frontier:
        n = frontier.pop(0)
        if n.op == "call_function" and n.target in PROJECTIONS:
            act_i, w_i = PROJECTIONS[n.target]
            weight = n.args[w_i] if len(n.args) > w_i else None
            if parameter_behind(gm, weight) is not None:
                cur = n.args[act_i]
                for _ in range(4):  # undo a flattening view: [B*T, C] <- [B, T, C]
                    shape = shape_of(cur)
                    if shape is not None and len(shape) == 3 and same_dim(shape[0], B) and same_dim(shape[1], T):
                        return cur, int(shape[2])
                    if cur.op == "call_function" and cur.target in LAYOUT_OPS:
                        cur = cur.args[0]
                    else:
                        break
                return None, None
        for inp in n.all_input_nodes:
            if inp not in seen and inp.op == "call_function":
                seen.add(inp)
                frontier.append(inp)
    return None, None
