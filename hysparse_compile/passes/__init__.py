"""The compiler as a visible list of FX passes: `GraphModule` in, `GraphModule` out, state in one `CompileState`.

    capture -> find_attention -> assign_roles -> rewrite -> plan_memory

Each pass is a module with one job and a `run(state) -> state` function; the pipeline keeps the graph after every pass
(`state.graphs[name]`, printed IR) and logs what each pass matched and changed. Passes before `rewrite` only read; the
rewrite edits a private copy (the exported program's module), never the user's model. Only the modules named in
`PIPELINE` are passes; the others here are `find_attention`'s helpers (probe.py and its graph-walking modules). What
the passes put in the graph, and its dtype/device portability, live in `hysparse_compile/graph/`.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from . import assign_roles, capture, find_attention, plan_memory, rewrite

log = logging.getLogger(__name__)


@dataclass
class CompileState:
    """Everything the passes read and write. Fields are filled pass by pass (None until then)."""

    model: nn.Module
    schedule: Any
    backend: str = "auto"
    options: dict = field(default_factory=dict)
    example_inputs: Any = None
    # capture
    gm: torch.fx.GraphModule | None = None
    token_name: str = "input_ids"
    call_inputs: dict = field(default_factory=dict)  # name -> example value passed to the graph (kwargs order)
    example_shape: tuple[int, int] | None = None  # (batch, seq_len) of the user's (or generated) example
    generated_example: bool = False
    # find_attention
    sites: list = field(default_factory=list)  # list[find_attention.AttentionSite], layer order
    padding: bool = False  # the model's masks honour attention_mask (left padding is rolled away in the graph)
    # assign_roles
    specs: tuple = ()  # schedule.layers, one LayerSpec per site
    # rewrite
    new_parameters: dict = field(default_factory=dict)  # qualified name -> nn.Parameter
    edges: list = field(default_factory=list)  # (src_layer, dst_layer, "kv" | "indices")
    # plan_memory
    kv_plan: Any = None
    # pipeline bookkeeping
    graphs: dict = field(default_factory=dict)  # pass name -> printed graph after it
    timings: dict = field(default_factory=dict)  # pass name -> seconds


PIPELINE: tuple[tuple[str, Callable[[CompileState], CompileState]], ...] = (
    ("capture", capture.run),
    ("find_attention", find_attention.run),
    ("assign_roles", assign_roles.run),
    ("rewrite", rewrite.run),
    ("plan_memory", plan_memory.run),
)


def graph_text(gm: torch.fx.GraphModule) -> str:
    """The graph as readable Python (what `print_readable` shows), without colour codes."""
    return gm.print_readable(print_output=False, include_stride=False, include_device=False, colored=False)


def run_pipeline(state: CompileState) -> CompileState:
    """Run every pass of `PIPELINE` in order, keeping the graph after each one."""
    for name, run in PIPELINE:
        t0 = time.perf_counter()
        state = run(state)
        state.timings[name] = time.perf_counter() - t0
        state.graphs[name] = graph_text(state.gm)
        log.info("pass %s done in %.2fs", name, state.timings[name])
    return state


__all__ = ["CompileState", "PIPELINE", "run_pipeline", "graph_text"]
