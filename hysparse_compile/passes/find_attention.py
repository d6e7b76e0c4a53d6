"""Pass 2 — find attention: every attention site of the captured graph, in layer order.

Two forms are recognized, written here as the code they match:

    aten.scaled_dot_product_attention(q, k, v, attn_mask=mask | None, is_causal=..., scale=s)   # sdpa paths
    softmax(matmul(q, k^T) * s [+ mask | masked_fill | where]) -> [cast / dropout] -> matmul(p, v)   # eager paths

For each site: q, k, v are walked back through layout ops (view, reshape, expand, unsqueeze, transpose,
repeat_interleave, contiguous, ...) and scalar multiplies to the earliest `[B, h, T, d]` tensor, which is K/V before
any GQA repeat (Hkv heads) and post-RoPE; scalar factors fold into the scale. The gate input is the activation of the
nearest projection (linear / addmm / mm with a weight) upstream of q. The layer is the site's `nn_module_stack`.
Then `probe.check_sites` runs the graph once on a probe batch and proves each site's mask is causal (with padding
from attention_mask when the model honours it), that the logits are `scale * q.k`, and that K/V are repeated with
the repeat_interleave convention.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from . import probe

log = logging.getLogger(__name__)
aten = torch.ops.aten

LAYOUT_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default,
              aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.clone.default,
              aten.contiguous.default, aten.alias.default, aten.repeat_interleave.self_int, aten.transpose.int,
              aten.permute.default}
SCALAR_MUL = {aten.mul.Tensor, aten.mul.Scalar}
SCALAR_DIV = {aten.div.Tensor, aten.div.Scalar}
SDPA = {aten.scaled_dot_product_attention.default}
SOFTMAX = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
MATMUL = {aten.matmul.default, aten.bmm.default}
PASS_THROUGH = {aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.type_as.default,
                aten.dropout.default, aten.clone.default, aten.contiguous.default, aten.alias.default}
PROJECTIONS = {aten.linear.default: (0, 1), aten.addmm.default: (1, 2), aten.mm.default: (0, 1),
               aten.matmul.default: (0, 1)}  # op -> (activation arg, weight arg)


@dataclass
class AttentionSite:
    """One attention call of the model. Node fields point into the captured graph."""

    index: int
    kind: str  # "sdpa" | "softmax"
    module: str  # the attention module, e.g. "model.layers.3.self_attn"
    layer: str  # where new parameters go, e.g. "model.layers.3"
    out: Node  # the attention output [B, Hq, T, d]; its users get the HySparse output
    q: Node  # [B, Hq, T, d] as scored (post-RoPE)
    k: Node  # [B, Hkv, T, d] before any GQA repeat (post-RoPE)
    v: Node  # [B, Hkv, T, d] before any GQA repeat
    scale: float  # the model's own softmax scale (scalar factors found on q included)
    heads: int
    kv_heads: int
    head_dim: int
    gate_input: Node | None  # [B, T, hidden] (or [B*T, hidden]) feeding the Q projection
    hidden: int | None
    q_arg: Node  # q / k / v as the attention consumed them (for the probe's checks)
    k_arg: Node
    v_arg: Node
    arg_scale: float  # the scale applied to q_arg . k_arg
    mask: Node | None  # sdpa attn_mask
    is_causal: bool  # sdpa is_causal flag
    logits: Node | None  # the softmax input (eager form)

    def describe(self) -> str:
        return (f"layer {self.index} ({self.module}, {self.kind}): Hq={self.heads} Hkv={self.kv_heads} "
                f"d={self.head_dim} scale={self.scale:.6g}")


def module_path(node: Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    paths = [v[0] for v in stack.values() if isinstance(v, tuple) and v and isinstance(v[0], str)]
    return paths[-1] if paths else ""


def _shape(node) -> tuple | None:
    val = node.meta.get("val") if isinstance(node, Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def const_value(gm: GraphModule, x):
    """The Python number behind a scalar argument (a literal, torch.full([]) / scalar_tensor, a 0-d constant), or
    None when it is not a constant."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x)
    if not isinstance(x, Node):
        return None
    if x.op == "get_attr":
        t = gm
        for part in x.target.split("."):
            t = getattr(t, part, None)
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


def _is_qkv_shape(shape, B, T, d) -> bool:
    return (shape is not None and len(shape) == 4 and same_dim(shape[0], B) and same_dim(shape[2], T)
            and same_dim(shape[3], d))


def peel(gm: GraphModule, node: Node, B, T, d) -> tuple[Node, float]:
    """Walk back from a q/k/v argument through layout ops and scalar multiplies; returns the earliest node of shape
    [B, h, T, d] on that chain and the scalar factor between it and the argument."""
    best, factor, best_factor = node, 1.0, 1.0
    cur = node
    for _ in range(32):
        if _is_qkv_shape(_shape(cur), B, T, d):
            best, best_factor = cur, factor
        if cur.op != "call_function":
            break
        if cur.target in LAYOUT_OPS or _full_slice(cur):
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


def _full_slice(node: Node) -> bool:
    """`x[:, :, None]`-style indexing records a slice that keeps the whole axis; it is a layout op."""
    if node.target is not aten.slice.Tensor:
        return False
    args = list(node.args) + [None] * (5 - len(node.args))
    _, dim, start, end, step = args[:5]
    size = _shape(node.args[0])[dim or 0] if _shape(node.args[0]) is not None else None
    return (start in (None, 0) and (end is None or end >= 2**62 or (isinstance(end, int) and end == size))
            and step in (None, 1))


def _scores_chain(gm: GraphModule, node, scale: float = 1.0, depth: int = 0):
    """From a softmax input back to `matmul(q, k^T)`: returns (matmul node, scalar scale) or None."""
    if not isinstance(node, Node) or node.op != "call_function" or depth > 16:
        return None
    t = node.target
    if t in MATMUL:
        return node, scale
    if t in SCALAR_MUL:
        for a, b in ((node.args[0], node.args[1]), (node.args[1], node.args[0])):
            c = const_value(gm, b)
            if c is not None:
                return _scores_chain(gm, a, scale * c, depth + 1)
        return None
    if t in SCALAR_DIV:
        c = const_value(gm, node.args[1])
        return _scores_chain(gm, node.args[0], scale / c, depth + 1) if c else None
    if t in PASS_THROUGH or t in (aten.masked_fill.Scalar, aten.masked_fill.Tensor):
        return _scores_chain(gm, node.args[0], scale, depth + 1)
    if t is aten.sub.Tensor:
        return _scores_chain(gm, node.args[0], scale, depth + 1)
    if t is aten.add.Tensor:
        for a in node.args[:2]:
            found = _scores_chain(gm, a, scale, depth + 1)
            if found:
                return found
    if t is aten.where.self:
        for a in node.args[1:3]:
            found = _scores_chain(gm, a, scale, depth + 1)
            if found:
                return found
    return None


def _value_matmul(softmax: Node) -> Node | None:
    """The `matmul(probs, v)` fed by a softmax (through casts and dropout)."""
    frontier, seen = [softmax], set()
    while frontier:
        n = frontier.pop()
        for user in n.users:
            if user in seen:
                continue
            seen.add(user)
            if user.op == "call_function" and user.target in MATMUL and user.args[0] is n:
                return user
            if user.op == "call_function" and user.target in PASS_THROUGH:
                frontier.append(user)
    return None


def gate_input(node: Node, B, T) -> tuple[Node | None, int | None]:
    """The activation of the nearest projection upstream of q (breadth first), as [B, T, hidden] when it can be
    recovered, else the projection's own [B*T, hidden] input."""
    frontier, seen = [node], {node}
    while frontier:
        n = frontier.pop(0)
        if n.op == "call_function" and n.target in PROJECTIONS:
            act_i, w_i = PROJECTIONS[n.target]
            weight = n.args[w_i] if len(n.args) > w_i else None
            if isinstance(weight, Node) and weight.op == "get_attr":
                act = n.args[act_i]
                cur = act
                for _ in range(4):  # undo a flattening view: [B*T, C] <- [B, T, C]
                    shape = _shape(cur)
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


def _sdpa_site(gm, node: Node):
    args, kw = list(node.args), dict(node.kwargs)
    names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal"]
    bound = {n: a for n, a in zip(names, args)}
    bound.update(kw)
    q_arg, k_arg, v_arg = bound["query"], bound["key"], bound["value"]
    d = _shape(q_arg)[3]
    scale = bound.get("scale")
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(d)
    dropout = const_value(gm, bound.get("dropout_p", 0.0))
    if dropout:
        log.warning("find_attention: %s has attention dropout %s; the rewrite drops it", module_path(node), dropout)
    return dict(kind="sdpa", out=node, q_arg=q_arg, k_arg=k_arg, v_arg=v_arg, arg_scale=scale,
                mask=bound.get("attn_mask"), is_causal=bool(bound.get("is_causal", False)), logits=None)


def _softmax_site(gm, node: Node):
    found = _scores_chain(gm, node.args[0])
    out = _value_matmul(node)
    if found is None or out is None:
        return None
    scores, scale = found
    q_arg, kt_arg = scores.args[0], scores.args[1]
    kt_shape, q_shape, out_shape = _shape(kt_arg), _shape(q_arg), _shape(out)
    if any(s is None or len(s) != 4 for s in (kt_shape, q_shape, out_shape)):
        return None  # not the [B, H, T, d] layout (e.g. a router softmax): listed as seen, not matched
    k_arg = kt_arg  # [B, H, d, T]: peel() walks through its transpose to [B, h, T, d]
    return dict(kind="softmax", out=out, q_arg=q_arg, k_arg=k_arg, v_arg=out.args[1], arg_scale=scale, mask=None,
                is_causal=False, logits=node.args[0])


def _describe_seen(gm: GraphModule) -> list[str]:
    counts: dict[str, int] = {}
    interesting = ("attention", "softmax", "matmul", "bmm", "baddbmm", "einsum", "flex", "linear")
    for n in gm.graph.nodes:
        if n.op == "call_function":
            name = getattr(n.target, "__name__", str(n.target))
            if any(w in name for w in interesting):
                counts[name] = counts.get(name, 0) + 1
    return [f"{k} x{v}" for k, v in sorted(counts.items())] or ["no softmax, matmul or attention calls"]


def find_sites(gm: GraphModule) -> list[AttentionSite]:
    """Every attention site of `gm`, in graph (= layer) order. Raises ValueError when there is none."""
    sites, rejected = [], []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in SDPA:
            found = _sdpa_site(gm, node)
        elif node.target in SOFTMAX:
            found = _softmax_site(gm, node)
            if found is None:
                rejected.append(f"softmax at {module_path(node) or node.name} (not softmax(q @ k^T) @ v)")
                continue
        else:
            continue
        sites.append(_complete(gm, node, found, len(sites)))
    if not sites:
        seen = _describe_seen(gm) + rejected
        raise ValueError("find_attention: no attention the compiler recognizes (aten.scaled_dot_product_attention or "
                         "softmax(q @ k^T * scale [+ mask]) @ v); the graph has: " + "; ".join(seen))
    return sites


def _complete(gm, node: Node, found: dict, index: int) -> AttentionSite:
    q_shape = _shape(found["q_arg"])
    if q_shape is None or len(q_shape) != 4:
        raise ValueError(f"find_attention: attention at {module_path(node)} has a query of shape {q_shape}; "
                         f"expected [B, heads, T, head_dim]")
    B, Hq, T, d = q_shape
    q, q_factor = peel(gm, found["q_arg"], B, T, d)
    k, k_factor = peel(gm, found["k_arg"], B, T, d)
    v, _ = peel(gm, found["v_arg"], B, T, d)
    if not _is_qkv_shape(_shape(k), B, T, d) or not _is_qkv_shape(_shape(v), B, T, d):
        raise ValueError(f"find_attention: attention at {module_path(node)}: could not trace K/V back to "
                         f"[B, Hkv, T, d] tensors (found K {_shape(k)}, V {_shape(v)}, q {q_shape})")
    Hkv = _shape(k)[1]
    if _shape(v)[1] != Hkv or Hq % Hkv:
        raise ValueError(f"find_attention: attention at {module_path(node)} has {Hq} query heads, {Hkv} key heads "
                         f"and {_shape(v)[1]} value heads; HySparse needs query heads = a multiple of the KV heads")
    path = module_path(node)
    x, hidden = gate_input(q, B, T)
    return AttentionSite(index=index, module=path, layer=path.rsplit(".", 1)[0] if "." in path else path,
                         q=q, k=k, v=v, scale=found["arg_scale"] * q_factor * k_factor, heads=Hq, kv_heads=Hkv,
                         head_dim=d, gate_input=x, hidden=hidden, **found)


def _warn_long_range_masks(state) -> None:
    """The probe sees masks at the example length only; a configured sliding window longer than that is invisible."""
    config = getattr(state.model, "config", None)
    window = getattr(config, "sliding_window", None)
    if isinstance(window, int) and window > 0 and getattr(config, "use_sliding_window", True):
        log.warning("find_attention: config.sliding_window=%d: the original model masks keys older than %d tokens; "
                    "the compiled full layers attend to the whole prefix (outputs differ beyond %d tokens)",
                    window, window, window)


def run(state):
    sites = find_sites(state.gm)
    _warn_long_range_masks(state)
    state.padding = probe.check_sites(state, sites)
    state.sites = sites
    for site in sites:
        log.info("find_attention: matched %s; gate input %s", site.describe(),
                 site.gate_input.name if site.gate_input is not None else None)
    log.info("find_attention: %d attention sites; masks causal%s", len(sites),
             " with padding from attention_mask" if state.padding else "")
    return state
