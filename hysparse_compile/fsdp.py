"""FSDP2 support: per-module `fully_shard` on a compiled model.

A compiled model runs one flat FX graph: the original submodules (`model.layers.3`, `h.0.mlp`, ...) only hold
parameters and their `forward` is never called. FSDP2 (`torch.distributed.fsdp.fully_shard`) gathers a module's
parameters in hooks around that module's forward, so `fully_shard(compiled.model.layers[i])` alone would leave the
layer's parameters sharded (DTensors) when the graph reads them.

`split_sharded_regions` runs as a forward pre-hook of `HySparseModel`. When submodules of the compiled model have
been `fully_shard`-ed, it cuts each such module's region out of the flat graph — the nodes that export recorded as
running inside that module (`nn_module_stack`), the new nodes the rewrite put beside them, and the `get_attr` nodes of
its parameters — into a forward of that module, and replaces the region with one call of the module. FSDP's hooks then
gather the parameters before the region runs, free them after (`reshard_after_forward`), gather them again for its
backward and reduce-scatter its gradients, exactly as for an eager model. Values that cross regions (the full layer's
K/V and selected indices read by the sparse layers after it) become the region's outputs and the readers' inputs.

Nothing happens without FSDP submodules (plain runs, DDP, `fully_shard(compiled)` alone: the whole graph is then one
FSDP unit). The split is done once, at the first forward after sharding; sharding more submodules after that raises.
"""
from __future__ import annotations

import operator
import types

import torch
import torch.nn as nn
from torch.fx import Graph, GraphModule, Node

def _fsdp_paths(model: nn.Module) -> list[str]:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return []  # fully_shard needs a process group: the common, single-process case ends here
    from torch.distributed.fsdp import FSDPModule

    return [name for name, m in model.named_modules() if name and isinstance(m, FSDPModule)]


def split_sharded_regions(model: nn.Module, args) -> None:
    """Forward pre-hook: make every `fully_shard`-ed submodule of `model` a real module call in its graph."""
    paths = _fsdp_paths(model)
    done = getattr(model, "_fsdp_regions", None)
    if not paths and done is None:
        return None
    if done is not None:
        if set(paths) != set(done):
            raise RuntimeError(f"fully_shard was applied to {sorted(set(paths) ^ set(done))} after the compiled model "
                               f"already ran with FSDP submodules {sorted(done)}; shard every submodule before the "
                               f"first forward")
        return None
    gm = model.graph_module
    for path in sorted(paths, key=lambda p: -p.count(".")):  # innermost first: a nested region is one call inside
        extract_region(gm, path)
    gm.graph.lint()
    gm.recompile()
    model._fsdp_regions = tuple(paths)
    return None


def _stack(node: Node) -> tuple[str, ...]:
    """The module paths a node ran inside, outermost first (export's `nn_module_stack`); () for the root."""
    stack = node.meta.get("nn_module_stack") or {}
    paths = []
    for value in stack.values():
        path = value[0] if isinstance(value, tuple) else str(value)
        if path and not path.startswith("_empty"):
            paths.append(path)
    return tuple(paths)


def inside(path: str, target: str) -> bool:
    return target == path or target.startswith(path + ".")


def region_stacks(graph: Graph) -> dict[Node, tuple[str, ...]]:
    """Every node's module stack. Nodes the compiler added (no `nn_module_stack`) take the deepest stack among their
    inputs, the latest one on a tie: the K/V roll and `full_attention` of layer 0 belong to layer 0, the
    `sparse_attention` that reads layer 0's K/V and layer 1's queries belongs to layer 1. `get_attr` nodes belong to
    the module that owns the attribute."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    stacks: dict[Node, tuple[str, ...]] = {}
    for node in graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            stacks[node] = ()
        elif node.meta.get("nn_module_stack"):
            stacks[node] = _stack(node)
        else:
            inputs = [a for a in node.all_input_nodes if a.op not in ("placeholder", "get_attr")]
            best = max(inputs, key=lambda a: (len(stacks[a]), order[a]), default=None)
            stacks[node] = stacks[best] if best is not None else ()
    return stacks


def region_boundary(region: list[Node], members: set[Node], order: dict[Node, int], last: int):
    """(inputs, outputs, early) of a region of a graph, to replace it by one call: the values it reads from outside
    (in first-use order), its nodes read outside it, and (reader, node) when a node outside reads one of the
    region's values before the region's last node (index `last` in `order`): the region then cannot run as one
    call (early is None otherwise)."""
    inputs: dict[Node, None] = {}
    outputs = []
    for n in region:
        inputs.update((a, None) for a in n.all_input_nodes if a not in members)
        outside = [u for u in n.users if u not in members]
        if outside:
            early = [u for u in outside if order[u] < last]
            if early:
                return list(inputs), outputs, (early[0], n)
            outputs.append(n)
    return list(inputs), outputs, None


def extract_region(gm: GraphModule, path: str) -> Node | None:
    """Replace the nodes of `gm.graph` that run inside submodule `path` by one `call_module(path, ...)`, the module's
    forward becoming those nodes. Returns the call node (None when no node runs inside `path`)."""
    graph = gm.graph
    stacks = region_stacks(graph)
    region = [n for n in graph.nodes
              if (n.op in ("call_function", "call_method", "call_module") and path in stacks[n])
              or (n.op in ("get_attr", "call_module") and inside(path, n.target))]
    members = set(region)
    if not any(n.op != "get_attr" for n in region):
        return None
    order = {n: i for i, n in enumerate(graph.nodes)}
    last = max(order[n] for n in region if n.op != "get_attr")
    for n in (n for n in region if n.op == "get_attr"):
        outside = [u for u in n.users if u not in members]
        if outside:
            raise RuntimeError(f"FSDP: {n.target!r} of the fully_shard-ed module {path!r} is also used outside "
                               f"it (by {outside[0].name}); its parameters would be sharded there. Shard the "
                               f"module that owns every use (e.g. its parent) instead")
    inputs, outputs, early = region_boundary(region, members, order, last)
    if early:
        raise RuntimeError(f"FSDP: the fully_shard-ed module {path!r} does not run as one piece in the "
                           f"compiled graph ({early[0].name} outside it reads {early[1].name} before the module "
                           f"finishes); shard its parent module instead")

    sub = Graph()
    env: dict[Node, Node] = {}
    prefix = path + "."
    for a in inputs:
        env[a] = sub.placeholder(a.name)
    for n in region:
        new = sub.node_copy(n, lambda x: env[x])
        if n.op in ("get_attr", "call_module"):
            new.target = n.target[len(prefix):]
        env[n] = new
    sub.output(tuple(sub.call_function(_not_a_view, (env[o],)) for o in outputs))
    sub.lint()
    module = gm.get_submodule(path)
    module.forward = types.MethodType(_compile_forward(sub, path), module)

    anchor = next(n for n in graph.nodes if order[n] == last).next
    with graph.inserting_before(anchor):
        call = graph.call_module(path, tuple(inputs))
        call.meta["nn_module_stack"] = _parent_stack(region, path)
        results = [graph.call_function(operator.getitem, (call, i)) for i in range(len(outputs))]
    for o, r in zip(outputs, results):
        r.meta.update({k: v for k, v in o.meta.items() if k in ("val", "tensor_meta", "nn_module_stack")})
        o.replace_all_uses_with(r, delete_user_cb=lambda u: u not in members)
    for n in reversed(region):
        graph.erase_node(n)
    return call


def _not_a_view(x):
    """Region outputs leave as tensors of their own: FSDP hooks the outputs for its backward all-gather, and a hook
    on a view is lost if the view is later changed in place (FSDP warns about it). Only views are copied (the K/V of
    a full layer read by the sparse layers after it, when they are slices of a fused projection)."""
    return x.clone() if isinstance(x, torch.Tensor) and x._base is not None else x


def _parent_stack(region: list[Node], path: str) -> dict:
    """The `nn_module_stack` of the call node: that of the region's nodes, cut above `path`."""
    for n in region:
        stack = n.meta.get("nn_module_stack")
        if stack and path in _stack(n):
            out = {}
            for key, value in stack.items():
                if (value[0] if isinstance(value, tuple) else str(value)) == path:
                    break
                out[key] = value
            return out
    return {}


def _compile_forward(graph: Graph, path: str):
    """The region's graph as a Python function of (self, *inputs), reading parameters from `self` when it runs (so
    FSDP's gathered parameters are the ones used)."""
    code = graph.python_code(root_module="self")
    namespace = dict(code.globals)
    exec(compile(code.src, f"<hysparse region {path}>", "exec"), namespace)  # noqa: S102 - code generated by torch.fx
    return namespace["forward"]
