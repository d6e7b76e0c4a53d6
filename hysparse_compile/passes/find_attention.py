"""Pass 2 — find attention: every attention site of the captured graph, in layer order.

The forms recognized, written as the code they match:

    aten.scaled_dot_product_attention(q, k, v, attn_mask=mask | None, is_causal=..., scale=s)   # sdpa paths
    softmax(matmul(q, k^T) * s [+ mask | masked_fill | where]) -> [cast / dropout] -> matmul(p, v)   # eager paths

and the eager variants of `eager_attention.py`: soft-capped logits `cap * tanh(s * q.k / cap)` (Gemma 2) and learned
per-head sinks concatenated to the logits and dropped after the softmax (gpt-oss). A query pre-scale (`q * c`, Gemma's
`query_pre_attn_scalar`) folds into the scale.

For each site: q, k, v are walked back through layout ops (view, reshape, expand, unsqueeze, transpose,
repeat_interleave, contiguous, ...) and scalar multiplies to the earliest `[B, h, T, d]` tensor, which is K/V before
any GQA repeat (Hkv heads) and post-RoPE; scalar factors fold into the scale. The gate input is the activation of the
nearest projection (linear / addmm / mm / `x @ W.T` with a weight) upstream of q. The layer is the site's
`nn_module_stack`. Then `probe.check_sites` runs the graph once on a probe batch and proves what each site computes:
a causal mask, or a causal mask restricted to the last `w` keys (a sliding window: `w` is measured and recorded on the
site), with padding from attention_mask when the model honours it; logits `scale * q.k` (soft-capped when found);
K/V repeated with the repeat_interleave convention; the sinks' probabilities.

A site the compiler cannot take stops the compile with an error naming the layer, what was seen and why: attention
whose q/k and v head dims differ (multi-head latent attention, DeepSeek-V2/V3), a bias added to the logits (ALiBi:
Bloom, MPT, Falcon with alibi=True; relative position biases), masks that are neither causal nor a sliding window.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from torch.fx import GraphModule, Node

from . import eager_attention, probe
from .graph_walk import SDPA, SOFTMAX, attr_of, const_value, gate_input, is_qkv_shape, module_path, peel, shape_of

log = logging.getLogger(__name__)


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
    scale: float  # the model's own softmax scale (scalar factors found on q and k, a query pre-scale, included)
    heads: int
    kv_heads: int
    head_dim: int
    gate_input: Node | None  # [B, T, hidden] feeding the Q projection (or the fused QKV projection)
    hidden: int | None
    q_arg: Node  # q / k / v as the attention consumed them (for the probe's checks)
    k_arg: Node
    v_arg: Node
    arg_scale: float  # the scale applied to q_arg . k_arg
    mask: Node | None  # sdpa attn_mask
    is_causal: bool  # sdpa is_causal flag
    logits: Node | None  # eager form: the masked logits before the softmax (without a sink column)
    softcap: float | None = None  # logits = softcap * tanh(scale * q.k / softcap) (Gemma 2), None when plain
    sinks: Node | None = None  # get_attr of the model's own per-head sink logits [Hq] (gpt-oss), None when absent
    sinks_name: str | None = None  # their parameter's qualified name, e.g. "model.layers.0.self_attn.sinks"
    probs: Node | None = None  # eager form: the probabilities that multiply V (the probe checks them with sinks)
    window: int | None = None  # sliding window of the original layer (keys t-w+1 .. t), None when it is causal
    window_source: str | None = None  # "probe" (measured on the probe batch) | "config" (the HF config's layer type)

    def describe(self) -> str:
        extra = "".join([f" softcap={self.softcap:g}" if self.softcap else "",
                         f" sinks={self.sinks_name}" if self.sinks is not None else "",
                         f" window={self.window} ({self.window_source})" if self.window else ""])
        return (f"layer {self.index} ({self.module}, {self.kind}): Hq={self.heads} Hkv={self.kv_heads} "
                f"d={self.head_dim} scale={self.scale:.6g}{extra}")


def _sdpa_site(gm, node: Node):
    args, kw = list(node.args), dict(node.kwargs)
    names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal"]
    bound = {n: a for n, a in zip(names, args)}
    bound.update(kw)
    q_arg, k_arg, v_arg = bound["query"], bound["key"], bound["value"]
    d = shape_of(q_arg)[3]
    scale = bound.get("scale")
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(d)
    dropout = const_value(gm, bound.get("dropout_p", 0.0))
    if dropout:
        log.warning("find_attention: %s has attention dropout %s; the rewrite drops it", module_path(node), dropout)
    return dict(kind="sdpa", out=node, q_arg=q_arg, k_arg=k_arg, v_arg=v_arg, arg_scale=scale,
                mask=bound.get("attn_mask"), is_causal=bool(bound.get("is_causal", False)), logits=None)


def _softmax_site(gm, node: Node):
    found = eager_attention.match(gm, node)
    if isinstance(found, str):
        return found
    q_arg, kt_arg = found.scores.args[0], found.scores.args[1]
    if any(s is None or len(s) != 4 for s in (shape_of(kt_arg), shape_of(q_arg), shape_of(found.out))):
        return "not the [B, H, T, d] layout"  # e.g. a router softmax: listed as seen, not matched
    sinks_name = found.sinks.target if found.sinks is not None else None
    return dict(kind="softmax", out=found.out, q_arg=q_arg, k_arg=kt_arg, v_arg=found.out.args[1],
                arg_scale=found.scale, mask=None, is_causal=False, logits=found.logits, softcap=found.softcap,
                sinks=found.sinks, sinks_name=sinks_name, probs=found.probs)


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
            if isinstance(found, str):
                rejected.append(f"softmax at {module_path(node) or node.name} ({found})")
                continue
        else:
            continue
        sites.append(_complete(gm, node, found, len(sites)))
    if not sites:
        seen = _describe_seen(gm) + rejected
        raise ValueError("find_attention: no attention the compiler recognizes (aten.scaled_dot_product_attention or "
                         "softmax(q @ k^T * scale [+ mask]) @ v, with soft-capped logits or sinks); the graph has: "
                         + "; ".join(seen))
    return sites


def _complete(gm, node: Node, found: dict, index: int) -> AttentionSite:
    path = module_path(node)
    where = f"layer {index} ({path or node.name})"
    q_shape = shape_of(found["q_arg"])
    if q_shape is None or len(q_shape) != 4:
        raise ValueError(f"find_attention: attention at {where} has a query of shape {q_shape}; "
                         f"expected [B, heads, T, head_dim]")
    B, Hq, T, d = q_shape
    v_shape = shape_of(found["v_arg"])
    if v_shape is not None and len(v_shape) == 4 and v_shape[3] != d:
        raise ValueError(f"find_attention: {where} attends with query/key heads of dim {d} and value heads of dim "
                         f"{v_shape[3]}: multi-head latent attention (DeepSeek-V2/V3 MLA) or another layout whose "
                         f"q.k and V head dims differ. Not supported: HySparse's ops take one head dim for q, k and v, "
                         f"and a sparse layer attends over the full layer's K/V as if they were its own")
    q, q_factor = peel(gm, found["q_arg"], B, T, d)
    k, k_factor = peel(gm, found["k_arg"], B, T, d)
    v, _ = peel(gm, found["v_arg"], B, T, d)
    if not is_qkv_shape(shape_of(k), B, T, d) or not is_qkv_shape(shape_of(v), B, T, d):
        raise ValueError(f"find_attention: attention at {where}: could not trace K/V back to "
                         f"[B, Hkv, T, d] tensors (found K {shape_of(k)}, V {shape_of(v)}, q {q_shape})")
    Hkv = shape_of(k)[1]
    if shape_of(v)[1] != Hkv or Hq % Hkv:
        raise ValueError(f"find_attention: attention at {where} has {Hq} query heads, {Hkv} key heads "
                         f"and {shape_of(v)[1]} value heads; HySparse needs query heads = a multiple of the KV heads")
    sinks = found.get("sinks")
    if sinks is not None and tuple(attr_of(gm, sinks).shape) != (Hq,):
        raise ValueError(f"find_attention: {where} concatenates sinks of shape {tuple(attr_of(gm, sinks).shape)} to "
                         f"its logits; sinks are one logit per query head ({Hq},)")
    x, hidden = gate_input(gm, q, B, T)
    return AttentionSite(index=index, module=path, layer=path.rsplit(".", 1)[0] if "." in path else path,
                         q=q, k=k, v=v, scale=found["arg_scale"] * q_factor * k_factor, heads=Hq, kv_heads=Hkv, head_dim=d, gate_input=x, hidden=hidden, **found)


def run(state):
    sites = find_sites(state.gm)
    state.padding = probe.check_sites(state, sites)
    _config_windows(state, sites)
    state.sites = sites
    for site in sites:
        log.info("find_attention: matched %s; gate input %s", site.describe(),
                 site.gate_input.name if site.gate_input is not None else None)
    log.info("find_attention: %d attention sites; masks causal%s", len(sites),
             " with padding from attention_mask" if state.padding else "")
    return state


def _config_windows(state, sites) -> None:
    """Windows the probe could not see (the probe batch is shorter than the window) come from the HF config's layer
    types; a measured window that contradicts the config is reported (the measured one is what the graph does)."""
    from ..hybrid_swa import config_layer_windows

    try:
        windows = config_layer_windows(state.model, len(sites))
    except ValueError as e:  # a layer type that is neither global nor sliding: the probe has the last word
        log.warning("find_attention: %s", e)
        return
    if windows is None or len(windows) != len(sites):
        return
    probe_len = probe.probe_inputs(state)[state.token_name].shape[1]
    for site, window in zip(sites, windows):
        if site.window is None and window is not None and window < probe_len:
            log.warning("find_attention: layer %d (%s): the config gives a sliding window of %d but the graph "
                        "attends to all %d keys of the probe batch; treating the layer as causal", site.index,
                        site.module, window, probe_len)
        elif site.window is None and window is not None:
            site.window, site.window_source = window, "config"
        elif site.window is not None and window is not None and window != site.window:
            log.warning("find_attention: layer %d (%s): the config gives a sliding window of %d but the mask "
                        "measured on the probe batch keeps %d keys; using %d", site.index, site.module, window,
                        site.window, site.window)
