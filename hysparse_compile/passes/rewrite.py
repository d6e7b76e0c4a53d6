"""Pass 4 — rewrite: each full layer's attention becomes `runtime.layers.full_layer` (the op
`functional.full_attention`, or its cached form inside a KV-cache call), each sparse layer's
`runtime.layers.sparse_layer` (`functional.sparse_attention`), with real graph edges from the full layer's K/V and
indices to the sparse layers that read them (docs/design.md; kv_sharing, swa and mode as the schedule says).

The graph module gets the model's call state (`hysparse_call`, a `runtime.state.CallState`), read once by a
`get_attr` node and passed as `call=` to every node that depends on the call in progress (the attention layers, the
padding rolls, the positions of models that number them). What find_attention recorded about the model's own
attention becomes the nodes' keywords too: its soft-capping (`softcap=site.softcap`, both layer kinds) and its
per-head sinks (`sinks=<get_attr of the model's parameter>`: a full layer's softmax, a sparse layer's branches).

Selecting nothing (docs/compiler.md, "Hybrid-SWA models"): a full layer with `topk=0` runs the op with one block and
hands its sparse layers one column of -1 (`graph_ops.select_nothing`); a window-only layer (`W`, no full layer to
read) gets such a column made from its queries (`graph_ops.window_only_indices`) and attends to its own window.

Sparse layers get new parameters, registered under the layer's module path in the captured module (so they appear
as e.g. `model.layers.5.hysparse.gate.weight` and `model.layers.5.hysparse.sinks` in `state_dict()`):
- `gate.weight` [branches * Hq * e, hidden], no bias, e = head_dim (gate="element") or 1 (gate="head"),
  branches = 2 with SWA else 1; zero-initialized (both gates 0.5) unless options give `gate_init`;
- `sinks` [Hq] logits, `sink_init` (default 0.0) — unless the model has its own sinks (gpt-oss), which serve instead.
`mode="training_free"` adds none (merge=True, the layer's own K/V, no gates, no sinks); nor do window-only layers.
"""
from __future__ import annotations

import logging
import operator

import torch
import torch.nn as nn
from torch.fx import GraphModule, Node

from ..graph import graph_ops
from ..runtime import layers as runtime_layers
from ..runtime.state import GRAPH_ATTRIBUTE, CallState

log = logging.getLogger(__name__)
ASSERT_META = torch.ops.aten._assert_tensor_metadata.default
DEAD_IF_UNUSED = {torch.ops.aten.dropout.default, torch.ops.aten.native_dropout.default}


def _new_layer_params(gm, site, spec, options) -> tuple[str, nn.Module]:
    """The `hysparse` submodule of one sparse layer: gate (nn.Linear, no bias) and sinks, initialized per options."""
    val = site.q.meta["val"]
    dtype, device = val.dtype, val.device  # new parameters follow the queries' dtype and device
    mod = nn.Module()
    if spec.gate != "none":
        branches = 2 if spec.window is not None else 1
        per = site.head_dim if spec.gate == "element" else 1
        mod.gate = nn.Linear(site.hidden, branches * site.heads * per, bias=False, device=device, dtype=dtype)
        init = options.get("gate_init", 0.0)
        with torch.no_grad():
            init(mod.gate.weight) if callable(init) else mod.gate.weight.fill_(float(init))
    if spec.sinks and site.sinks is None:  # a model's own sinks (gpt-oss) serve as the layer's sinks
        mod.sinks = nn.Parameter(torch.full((site.heads,), float(options.get("sink_init", 0.0)), dtype=dtype,
                                            device=device))
    name = f"{site.layer}.hysparse" if site.layer else "hysparse"
    taken = {n for n, _ in gm.named_modules()}
    base, i = name, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return name, mod


class _Emitter:
    """Inserts nodes before a site's output node; rolls tensors into the padding-free layout when needed."""

    def __init__(self, graph, shift: Node | None, call: Node):
        self.graph, self.shift, self.call_state = graph, shift, call

    def call(self, fn, *args, **kwargs) -> Node:
        return self.graph.call_function(fn, args, kwargs)

    def roll(self, node: Node, dim: int = 2) -> Node:
        return node if self.shift is None else self.call(graph_ops.roll_rows, node, self.shift, dim,
                                                         call=self.call_state)

    def unroll(self, node: Node) -> Node:
        return node if self.shift is None else self.call(graph_ops.unroll_rows, node, self.shift, 2,
                                                         call=self.call_state)


def _call_state_node(gm: GraphModule) -> Node:
    """The graph's `get_attr` of its CallState (made here: the rewritten graph is the model's own)."""
    setattr(gm, GRAPH_ATTRIBUTE, CallState())
    first = next(n for n in gm.graph.nodes if n.op != "placeholder")
    with gm.graph.inserting_before(first):
        return gm.graph.create_node("get_attr", GRAPH_ATTRIBUTE)


def _shift_node(gm: GraphModule, state) -> Node | None:
    if not state.padding:
        return None
    mask = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.target == "attention_mask")
    with gm.graph.inserting_before(state.sites[0].out):
        return gm.graph.call_function(graph_ops.left_pad_shift, (mask,))


def _options(site) -> dict:
    """The optional op parameters of the model's own attention: its soft-capping (Gemma 2), none when plain."""
    return {"softcap": site.softcap} if site.softcap else {}


def _rewrite_full(em: _Emitter, site, spec, backend) -> dict:
    q, k, v = em.roll(site.q), em.roll(site.k), em.roll(site.v)
    extra = dict(_options(site), **({"sinks": site.sinks} if site.sinks is not None else {}))
    res = em.call(runtime_layers.full_layer, q, k, v, layer=site.index, block_size=spec.block_size,
                  topk=spec.topk or spec.block_size, scale=site.scale, backend=backend, call=em.call_state, **extra)
    out = em.call(operator.getitem, res, 0)  # [B, Hq, T, d]
    indices = em.call(operator.getitem, res, 1)  # int32 [B, Hkv, T, nsel]
    if spec.topk == 0:  # selects nothing: the one block the op picked is dropped
        indices = em.call(graph_ops.select_nothing, indices)
    return dict(out=em.unroll(out), k=k, v=v, indices=indices)


def _rewrite_sparse(em: _Emitter, gm, site, spec, full: dict | None, params: str | None, backend,
                    save_branches: bool = False) -> tuple[Node, list]:
    """A sparse layer; `full` is None for a window-only layer (it reads its own K/V, kv_sharing="none")."""
    q, k_own, v_own = em.roll(site.q), em.roll(site.k), em.roll(site.v)
    edges = ["indices"] if full is not None else []
    if spec.merge:  # training-free: one softmax over selected blocks ∪ window of the layer's own K/V
        k_own_, v_own_, k_shared, v_shared = k_own, v_own, k_own, v_own
    elif spec.kv_sharing == "sparse_branch":
        k_own_, v_own_, k_shared, v_shared = k_own, v_own, full["k"], full["v"]
        edges.append("kv")
    elif spec.kv_sharing == "both":
        k_own_, v_own_, k_shared, v_shared = full["k"], full["v"], full["k"], full["v"]
        edges.append("kv")
    else:  # "none": oracle selection only
        k_own_, v_own_, k_shared, v_shared = k_own, v_own, k_own, v_own
    gates, sinks = [None, None], site.sinks  # the model's own sinks (gpt-oss), where it has them
    if params is not None and not spec.merge:
        mod = gm.get_submodule(params)
        if hasattr(mod, "gate"):
            weight = em.graph.get_attr(f"{params}.gate.weight")
            branches = 2 if spec.window is not None else 1
            x = em.roll(site.gate_input, dim=1)
            g = em.call(graph_ops.branch_gates, x, weight, site.heads, branches)
            gates = [em.call(operator.getitem, g, i) for i in range(branches)] + [None] * (2 - branches)
        if hasattr(mod, "sinks"):
            sinks = em.graph.get_attr(f"{params}.sinks")
    indices = full["indices"] if full is not None else em.call(graph_ops.window_only_indices, q, site.kv_heads)
    out = em.call(runtime_layers.sparse_layer, q, k_own_, v_own_, k_shared, v_shared, indices,
                  layer=site.index, block_size=spec.block_size, window=spec.window, gate_sparse=gates[0],
                  gate_swa=gates[1], sinks=sinks, scale=site.scale, merge=spec.merge, save_branches=save_branches,
                  backend=backend, call=em.call_state, **_options(site))
    return em.unroll(out), edges


def _drop_dead_code(gm: GraphModule) -> None:
    """Dead code elimination that also drops what FX keeps as impure but is dead here: `_assert_tensor_metadata`
    checks on otherwise unused values (softmax probabilities, masks) and unused dropout (a seeded random op)."""
    changed = True
    while changed:
        changed = False
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.users:
                continue
            arg = node.args[0] if node.args else None
            dead_assert = (node.target is ASSERT_META and isinstance(arg, Node)
                           and all(u.target is ASSERT_META for u in arg.users))
            if dead_assert or node.target in DEAD_IF_UNUSED:
                gm.graph.erase_node(node)
                changed = True
        changed |= gm.graph.eliminate_dead_code()


ARANGE = {torch.ops.aten.arange.default, torch.ops.aten.arange.start, torch.ops.aten.arange.start_step}


def _offset_positions(gm: GraphModule, state, call: Node) -> int:
    """Models that number positions themselves (`arange(T)`, no position input) get the arange routed through
    `runtime.layers.positions`, which shifts it by the tokens a cached call has already seen. Returns the count."""
    if "position_ids" in state.call_inputs:
        return 0
    token = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.target == state.token_name)
    seq = [u for u in token.users if u.target == torch.ops.aten.sym_size.int and u.args[1] == 1]
    count = 0
    for node in list(gm.graph.nodes):
        if node.target not in ARANGE or not any(a in seq for a in node.args):
            continue
        with gm.graph.inserting_after(node):
            shifted = gm.graph.call_function(runtime_layers.positions, (node,), {"call": call})
        node.replace_all_uses_with(shifted, delete_user_cb=lambda user: user is not shifted)
        count += 1
    return count


def run(state):
    gm, sites, specs = state.gm, state.sites, state.specs
    new_mods = {}
    for site, spec in zip(sites, specs):
        if spec.role == "sparse" and not spec.merge and (spec.gate != "none" or spec.sinks):
            name, mod = _new_layer_params(gm, site, spec, state.options)
            gm.add_submodule(name, mod)
            new_mods[site.index] = name
            for pname, p in mod.named_parameters():
                state.new_parameters[f"{name}.{pname}"] = p
    call = _call_state_node(gm)
    shift = _shift_node(gm, state)
    full_outputs, edges = {}, []
    for site, spec in zip(sites, specs):
        em = _Emitter(gm.graph, shift, call)
        with gm.graph.inserting_before(site.out):
            if spec.role == "full":
                full_outputs[site.index] = _rewrite_full(em, site, spec, state.backend)
                new_out = full_outputs[site.index]["out"]
                log.info("rewrite: layer %d (%s): %s -> full_attention(block_size=%d, topk=%d, scale=%.6g)",
                         site.index, site.module, site.out.target, spec.block_size, spec.topk, site.scale)
            else:
                new_out, kinds = _rewrite_sparse(em, gm, site, spec, full_outputs.get(spec.kv_source),
                                                 new_mods.get(site.index), state.backend,
                                                 bool(state.options.get("save_branches", False)))
                edges += [(spec.kv_source, site.index, kind) for kind in kinds]
                log.info("rewrite: layer %d (%s): %s -> sparse_attention(window=%s, merge=%s) reading %s", site.index,
                         site.module, site.out.target, spec.window, spec.merge,
                         f"{'/'.join(kinds)} of layer {spec.kv_source}" if kinds else "its own window only")
        site.out.replace_all_uses_with(new_out)
        gm.graph.erase_node(site.out)  # sdpa is tagged random (dropout), so plain DCE would keep it
    _drop_dead_code(gm)
    shifted = _offset_positions(gm, state, call)
    gm.graph.lint()
    gm.recompile()
    state.edges = edges
    log.info("rewrite: %d full and %d sparse layers, %d new parameters (%d values), padding roll %s, %d position "
             "arange(s) made cache-aware", sum(s.role == "full" for s in specs), sum(s.role == "sparse" for s in specs),
             len(state.new_parameters), sum(p.numel() for p in state.new_parameters.values()),
             "on" if shift is not None else "off", shifted)
    return state
