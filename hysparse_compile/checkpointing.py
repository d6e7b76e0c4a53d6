"""Gradient checkpointing of a compiled model: each decoder layer's region of the flat graph runs under
`torch.utils.checkpoint` (non-reentrant), so training keeps only what enters each layer and recomputes the rest in
the backward.

    >>> compiled.gradient_checkpointing_enable()          # HF's name; `activation_checkpointing_enable` too
    >>> compiled.train()
    >>> compiled(input_ids=ids, labels=ids).loss.backward()   # same loss and gradients, less activation memory
    >>> compiled.gradient_checkpointing_disable()

A compiled model runs one flat FX graph, so HF's way (a flag on each decoder layer module, read by its `forward`)
has nothing to hook into. Instead, on the first training forward with checkpointing on, `build` derives a second
graph from the model's graph: the nodes export recorded as running inside decoder layer `L` (`nn_module_stack`;
the nodes the rewrite added go with the deepest layer among their inputs, as for FSDP, see fsdp.py) become one
*region*, a Python function of the root module and the values that enter the layer; in the derived graph the region
is a single call that runs that function under `torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`. Values
that cross layers (a full layer's K/V and selected indices, read by the sparse layers after it) are region outputs
and inputs like the hidden state. Parameters are read from the live module tree when a region runs (never copied),
so optimizers, `load_state_dict`, FSDP's parameter swaps and dtype moves are seen. The derived graph is rebuilt
whenever the model's graph is recompiled (FSDP's per-layer split, a LoRA rewrite, a dtype move).

The decoder layers are the modules the compiler put each attention site in (`site.layer`, e.g. `model.layers.3`),
so every model the compiler takes gets one region per attention layer. The padding flag of the call (the model's
`runtime.state.CallState`, `unpadded`) is captured at the forward and set again for the recomputation, so the
backward recomputes exactly what the forward ran; dropout is replayed with the forward's RNG state (checkpoint's
default).
"""
from __future__ import annotations

import contextlib
import logging
import operator
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.fx import Graph, GraphModule, Node

from . import fsdp
from .runtime import state as runtime_state

log = logging.getLogger(__name__)

_RUNNABLE = ("call_function", "call_method", "call_module")
CHECKPOINT_KWARGS = {"use_reentrant", "preserve_rng_state", "context_fn", "determinism_check", "debug", "early_stop"}


@dataclass
class Settings:
    """What `gradient_checkpointing_enable` was given. `kwargs` go to `torch.utils.checkpoint.checkpoint`;
    `every_n_layers=n` checkpoints layers 0, n, 2n, ...; `offload` keeps the saved layer inputs in host memory
    (`torch.autograd.graph.save_on_cpu`, as HF does)."""

    kwargs: dict = field(default_factory=dict)
    every_n_layers: int = 1
    offload: bool = False


@dataclass
class Checkpointed:
    """The derived graph of one version of a model's graph (`source` is that graph's generated code object)."""

    source: str
    forward: Callable  # forward(root, **graph_inputs) -> what the model's graph returns
    regions: list  # decoder layer paths that run checkpointed, in order


def settings_from(kwargs: dict | None, every_n_layers: int = 1, offload: bool = False) -> Settings:
    """Validated settings. `use_reentrant=True` is refused: a reentrant checkpoint only back-propagates into
    parameters when an input of the region requires grad, which a frozen (LoRA) embedding does not give."""
    kwargs = dict(kwargs or {})
    unknown = sorted(set(kwargs) - CHECKPOINT_KWARGS)
    if unknown:
        raise ValueError(f"gradient_checkpointing_kwargs: unknown key(s) {unknown}; torch.utils.checkpoint.checkpoint "
                         f"takes {sorted(CHECKPOINT_KWARGS)}")
    if kwargs.get("use_reentrant", False) is not False:
        raise ValueError(f"gradient_checkpointing_kwargs: use_reentrant={kwargs['use_reentrant']!r} is not supported "
                         f"by compiled models; their decoder layers are checkpointed with use_reentrant=False (leave "
                         f"it out, or pass False)")
    kwargs["use_reentrant"] = False
    if not isinstance(every_n_layers, int) or isinstance(every_n_layers, bool) or every_n_layers < 1:
        raise ValueError(f"every_n_layers must be a positive integer, got {every_n_layers!r}")
    return Settings(kwargs=kwargs, every_n_layers=every_n_layers, offload=bool(offload))


def layer_paths(sites) -> list[str]:
    """The decoder layers of a compiled model, in order: the module of each attention site (`site.layer`)."""
    paths = []
    for site in sites:
        if site.layer and site.layer not in paths:
            paths.append(site.layer)
    return paths


def run(compiled, call: dict, settings: Settings):
    """Run the compiled model's graph with its decoder layers checkpointed (building the derived graph first when the
    model's graph changed since the last build)."""
    gm = compiled.graph_module
    cached = compiled.checkpointed_graph
    if cached is None or cached.source is not gm.code:
        paths = layer_paths(compiled.attention_sites)
        cached = build(gm, paths[::settings.every_n_layers], settings)
        compiled.checkpointed_graph = cached
    return cached.forward(gm, **call)


def build(gm: GraphModule, paths: list[str], settings: Settings) -> Checkpointed:
    """The derived graph of `gm` in which each module path of `paths` is one checkpointed region."""
    graph = Graph()
    graph._codegen = gm.graph._codegen  # the same signature and output structure (pytree specs live on `gm`)
    env: dict[Node, Node] = {}
    graph.output(graph.graph_copy(gm.graph, env))
    done = []
    for path in paths:
        if _cut(graph, path, settings, root_of=gm):
            done.append(path)
    graph.lint()
    forward = _function(graph, "<hysparse checkpointed graph>")
    log.info("checkpointing: %d decoder layer regions run under torch.utils.checkpoint: %s", len(done),
             ", ".join(done))
    return Checkpointed(source=gm.code, forward=forward, regions=done)


def _cut(graph: Graph, path: str, settings: Settings, root_of: GraphModule) -> bool:
    """Replace the nodes of `graph` that run inside module `path` by one call of a checkpointed function."""
    stacks = fsdp.region_stacks(graph)
    region = [n for n in graph.nodes if n.op in _RUNNABLE
              and (path in stacks[n] or (n.op == "call_module" and fsdp.inside(path, n.target)))]
    if not region:
        return False
    members = set(region)
    for n in graph.nodes:  # parameters read only inside the layer are read inside the region
        if n.op == "get_attr" and n.users and all(u in members for u in n.users):
            members.add(n)
    region = [n for n in graph.nodes if n in members]
    order = {n: i for i, n in enumerate(graph.nodes)}
    last = max(order[n] for n in region)
    inputs, outputs, early = fsdp.region_boundary(region, members, order, last)
    if early:
        log.warning("checkpointing: %s does not run as one piece in the compiled graph (%s outside it reads %s "
                    "before it ends); it is not checkpointed", path, early[0].name, early[1].name)
        return False

    sub = Graph()
    senv: dict[Node, Node] = {}
    for a in inputs:
        senv[a] = sub.placeholder(a.name)
    for n in region:
        senv[n] = sub.node_copy(n, lambda x: senv[x])
    sub.output(tuple(senv[o] for o in outputs))
    sub.lint()
    region_fn = _function(sub, f"<hysparse checkpointed region {path}>")
    runner = _runner(region_fn, root_of, settings, path)

    anchor = next(n for n in graph.nodes if order.get(n) == last).next
    with graph.inserting_before(anchor):
        call = graph.call_function(runner, tuple(inputs))
        results = [graph.call_function(operator.getitem, (call, i)) for i in range(len(outputs))]
    for o, r in zip(outputs, results):
        r.meta.update({k: v for k, v in o.meta.items() if k in ("val", "tensor_meta", "nn_module_stack")})
        o.replace_all_uses_with(r, delete_user_cb=lambda u: u not in members)
    for n in reversed(region):
        graph.erase_node(n)
    return True


def _runner(region_fn: Callable, root: GraphModule, settings: Settings, path: str) -> Callable:
    """The function the derived graph calls for one region: checkpointed when autograd records, plain otherwise."""

    def region(*inputs):
        if not torch.is_grad_enabled():
            return region_fn(root, *inputs)
        call_state = runtime_state.of(root)
        unpadded = call_state.padding_free()  # the call's padding flag, set again for the recomputation

        def recomputable(*xs):
            with call_state.unpadded(unpadded):
                return region_fn(root, *xs)

        offload = contextlib.nullcontext()
        if settings.offload:
            pin = any(isinstance(x, torch.Tensor) and x.is_cuda for x in inputs)
            offload = torch.autograd.graph.save_on_cpu(pin_memory=pin)
        with offload:
            return torch.utils.checkpoint.checkpoint(recomputable, *inputs, **settings.kwargs)

    region.__name__ = "checkpointed_" + path.replace(".", "_")
    region.__qualname__ = region.__name__
    region.__module__ = __name__
    return region


def _function(graph: Graph, filename: str) -> Callable:
    """`graph` as a Python function of (root, *inputs), reading attributes from the root module when it runs."""
    code = graph.python_code(root_module="self")
    namespace = dict(code.globals)
    exec(compile(code.src, filename, "exec"), namespace)  # noqa: S102 - code generated by torch.fx
    return namespace["forward"]
