"""Dtype and device portability of the captured graph: `compile(model_fp32, s).to(torch.bfloat16)` (or `.half()`,
`.to("cuda")`) must run the model as the original model cast the same way would run.

torch.export writes down what it saw. A graph captured in float32 on the CPU holds `device(type='cpu')` in every
`arange`/`to.device`, `_assert_tensor_metadata(dtype=float32, device=cpu)` checks, and `torch.float32` in casts
that the model's code wrote as "the input's dtype" (RMSNorm's `.to(input_dtype)`, RoPE's `cos.to(x.dtype)`) next
to casts it wrote as a genuine float32 (RMSNorm's upcast, `position_ids.float()`): in one float32 graph the two
look the same. What is done about each (docs/compiler.md, "Dtype and device moves"):

- `_assert_tensor_metadata` nodes are dropped at capture (they check only what the capture saw).
- Device: every device constant equal to the capture device is marked as "the module's device"; `HySparseModel`'s
  `_apply` rewrites the marked constants to the device the parameters move to. A model whose code names the
  capture device literally is moved with it (the only reading under which the graph can run after the move).
- Dtype: at the first move to a new floating dtype, the original model is exported again, as fake tensors cast to
  that dtype (a parameter-free copy is kept from compile for this: `Portable.twin`), and the two graphs are
  compared node by node. A constant that is the capture dtype in one graph and the target dtype in the other
  follows the module's dtype; one that is equal in both stays (the genuine upcasts); `torch.finfo(dtype).min` and
  friends follow likewise. A cast that changes nothing returns its input itself, so a float32 capture records
  later uses of the *uncast* tensor as uses of the cast (the residual add after RMSNorm's `x.to(float32)` reads
  the upcast); where the other graph reads the cast's input, that use is rewired to the input (what the code
  wrote; the same values at every dtype). Anything else means the model's code takes another path at the new
  dtype: the move stops, before any tensor is touched, with an error that says to compile the model in that
  dtype. The markings are kept, so each dtype costs one export once per compiled model.

Node metadata: `node.meta[FOLLOW]` `{path: kind}` (path into `(args, kwargs)`, kind "dtype", "device" or
"finfo.<field>"), `node.meta[INDEX]` the node's position in the captured graph (to align a re-export);
`gm.meta[INFO]` a `Portable`.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
from collections import Counter
from typing import Any, Iterator

import torch
import torch.nn as nn
from torch.fx import GraphModule, Node

log = logging.getLogger(__name__)

ASSERT_META = torch.ops.aten._assert_tensor_metadata.default
FOLLOW = "hysparse_follow"
INDEX = "hysparse_capture_index"
INFO = "hysparse_portable"
FINFO_FIELDS = ("min", "max", "eps", "tiny")  # float constants a model may take from torch.finfo(its dtype)
_aten = torch.ops.aten
# ops that return their input itself when they change nothing (`x.to(x.dtype) is x`)
ALIASING = {_aten.to.dtype, _aten.to.dtype_layout, _aten.to.device, _aten.to.other, _aten.type_as.default,
            _aten.contiguous.default}


@dataclasses.dataclass
class Portable:
    """What the graph's dtype- and device-following constants hold now, and what is needed to learn more."""

    dtype: torch.dtype | None  # the module's floating dtype the graph is specialized to now (None: no float params)
    device: torch.device  # the device the graph's device constants name now
    capture_dtype: torch.dtype | None
    capture_device: torch.device
    num_nodes: int  # nodes of the captured graph (a re-export must have as many)
    inputs: dict  # the capture's example call: name -> tensor (small int tensors) or plain value
    twin: nn.Module | None  # the original model with meta tensors (structure only), for re-exports
    twin_error: str | None = None  # why there is no twin
    checked: set = dataclasses.field(default_factory=set)  # dtypes whose casts were checked by a re-export


# --------------------------------------------------------------------------------------------- args as leaves
def _leaves(value: Any, path: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _leaves(item, path + (i,))
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(item, path + (key,))
    else:
        yield path, value


def node_leaves(node: Node) -> dict[tuple, Any]:
    """{("args", i, ...) or ("kwargs", name, ...): value} for every leaf of the node's arguments."""
    return dict(itertools.chain(_leaves(tuple(node.args), ("args",)), _leaves(dict(node.kwargs), ("kwargs",))))


def _replaced(container: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(container, dict):
        new = dict(container)
        new[head] = _replaced(container[head], rest, value)
        return new
    items = list(container)
    items[head] = _replaced(items[head], rest, value)
    return tuple(items) if isinstance(container, tuple) else items


def _set_leaf(node: Node, path: tuple, value: Any) -> None:
    if path[0] == "args":
        node.args = _replaced(tuple(node.args), path[1:], value)
    else:
        node.kwargs = _replaced(dict(node.kwargs), path[1:], value)


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _finfo(dtype: torch.dtype | None, field: str) -> float | None:
    if dtype is None or not dtype.is_floating_point:
        return None
    return float(getattr(torch.finfo(dtype), field))


def _value(kind: str, dtype: torch.dtype | None, device: torch.device) -> Any:
    if kind == "dtype":
        return dtype
    if kind == "device":
        return device
    return _finfo(dtype, kind.split(".", 1)[1])


# --------------------------------------------------------------------------------------------- at capture
def floating_dtype(model: nn.Module) -> torch.dtype | None:
    """The floating dtype holding most of the model's parameter values (what `.to(dtype)` changes)."""
    counts: Counter = Counter()
    for p in model.parameters():
        if p.is_floating_point():
            counts[p.dtype] += p.numel()
    return counts.most_common(1)[0][0] if counts else None


def meta_twin(model: nn.Module) -> nn.Module:
    """A deep copy of `model` whose parameters and buffers are meta tensors (no storage): its code and structure."""
    memo: dict = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        if id(t) in memo:
            continue
        new = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
        memo[id(t)] = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new
    twin = copy.deepcopy(model, memo)
    return twin.eval()


def prepare(gm: GraphModule, model: nn.Module, call_inputs: dict, device: torch.device) -> Portable:
    """Right after export: number the nodes, drop the metadata asserts, mark device constants, keep a twin."""
    nodes = list(gm.graph.nodes)
    for i, node in enumerate(nodes):
        node.meta[INDEX] = i
    dropped = 0
    for node in nodes:
        if node.op == "call_function" and node.target is ASSERT_META and not node.users:
            gm.graph.erase_node(node)
            dropped += 1
    marked = 0
    for node in gm.graph.nodes:
        follow = {path: "device" for path, value in node_leaves(node).items()
                  if isinstance(value, torch.device) and _same_device(value, device)}
        if follow:
            node.meta[FOLLOW] = follow
            marked += len(follow)
    gm.recompile()
    try:
        twin, error = meta_twin(model), None
    except Exception as e:  # a model deepcopy refuses: dtype moves will say so
        twin, error = None, f"{type(e).__name__}: {e}"
    dtype = floating_dtype(model)
    inputs = {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in call_inputs.items()}
    info = Portable(dtype=dtype, device=device, capture_dtype=dtype, capture_device=device, num_nodes=len(nodes),
                    inputs=inputs, twin=twin, twin_error=error, checked={dtype} if dtype is not None else set())
    gm.meta[INFO] = info
    log.info("capture: dropped %d metadata asserts, %d device constants follow the module's device (capture dtype "
             "%s)%s", dropped, marked, dtype, "" if twin is not None else f"; no twin ({error})")
    return info


# --------------------------------------------------------------------------------------------- on a move
def info_of(gm: GraphModule) -> Portable | None:
    return gm.meta.get(INFO)


def target_of(gm: GraphModule, fn) -> tuple[torch.dtype | None, torch.device] | None:
    """The (dtype, device) the graph must name after `module._apply(fn)`: `fn` applied to an empty tensor of the
    module's current dtype and device. None when the graph has no portability record."""
    info = info_of(gm)
    if info is None:
        return None
    probe = torch.empty(0, dtype=info.dtype or torch.float32, device=info.device)
    with torch.no_grad():
        moved = fn(probe)
    if not isinstance(moved, torch.Tensor):
        return None
    dtype = moved.dtype if info.dtype is not None and moved.is_floating_point() else info.dtype
    return dtype, moved.device


def check_dtype(gm: GraphModule, dtype: torch.dtype | None) -> None:
    """Learn which dtype constants follow the module to `dtype` (one re-export of the twin, once per dtype);
    raise, changing nothing, when the model's code takes another path at that dtype."""
    info = info_of(gm)
    if info is None or dtype is None or dtype in info.checked:
        return
    if info.twin is None:
        raise RuntimeError(f"cannot move the compiled model to {dtype}: the dtype constants of its graph can only "
                           f"be checked against a copy of the original model, and copying it failed "
                           f"({info.twin_error}); compile the model cast to {dtype} instead")
    other = _export_twin(info, dtype)
    new_flags, rewires, problems = _compare(gm, other, info, dtype)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise RuntimeError(f"cannot move the compiled model from {info.dtype} to {dtype}: the model's code takes "
                           f"another path at {dtype} ({shown}); compile a copy of the model cast to {dtype} "
                           f"instead: hs.compile(copy.deepcopy(model).to({dtype}), schedule)")
    for node, flags in new_flags.items():
        node.meta[FOLLOW] = {**node.meta.get(FOLLOW, {}), **flags}  # a new dict: deep copies share node.meta values
    for node, path, source in rewires:
        _set_leaf(node, path, source)
    if rewires:
        gm.graph.lint()
        gm.recompile()
    info.checked.add(dtype)
    log.info("portable: checked %s against a re-export: %d dtype constants follow the module, %d uses of a no-op "
             "cast re-read its input", dtype, sum(len(f) for f in new_flags.values()), len(rewires))


def _export_twin(info: Portable, dtype: torch.dtype) -> GraphModule:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.export import Dim

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    memo: dict = {}
    with mode:
        for t in itertools.chain(info.twin.parameters(), info.twin.buffers()):
            if id(t) in memo:
                continue
            dt = dtype if t.is_floating_point() else t.dtype  # what module.to(dtype) does
            new = torch.empty_strided(t.shape, t.stride(), dtype=dt, device=info.capture_device)
            memo[id(t)] = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new
    twin = copy.deepcopy(info.twin, memo).eval()
    call = {k: (mode.from_tensor(v) if isinstance(v, torch.Tensor) else v) for k, v in info.inputs.items()}
    dims = {k: ({0: Dim.AUTO, 1: Dim.AUTO} if isinstance(v, torch.Tensor) else None) for k, v in call.items()}
    try:
        return torch.export.export(twin, (), call, dynamic_shapes=dims, strict=False).module()
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise RuntimeError(f"cannot move the compiled model to {dtype}: exporting the original model at {dtype} to "
                           f"check its dtype constants failed ({type(e).__name__}: {first}); compile a copy of the "
                           f"model cast to {dtype} instead") from e


def _through_noop_casts(node: Node) -> Iterator[Node]:
    """`node`, then what it casts, and so on, through the ops that return their input itself when nothing changes."""
    while True:
        yield node
        if node.op != "call_function" or node.target not in ALIASING or not node.args or \
                not isinstance(node.args[0], Node):
            return
        node = node.args[0]


def _compare(gm: GraphModule, other: GraphModule, info: Portable, dtype: torch.dtype):
    """Compare each live captured node of `gm` (constants as they are now, at `info.dtype`) with its counterpart in
    `other` (exported at `dtype`). Returns new follow flags {node: {path: kind}}, rewires [(node, path, source)]
    and the problems found.

    Rewires: a cast to the dtype a tensor already has returns the tensor itself, so the export records later uses of
    the *uncast* variable as uses of the cast (RMSNorm's `x.to(float32)` in a float32 capture: the residual add then
    reads the cast). Where one graph reads a cast and the other reads the cast's input, the cast was a no-op in the
    first one and the input is what the code meant: that use is rewired to the input (exact at every dtype)."""
    theirs = list(other.graph.nodes)
    if len(theirs) != info.num_nodes:
        return {}, [], [f"{len(theirs)} graph nodes instead of {info.num_nodes}"]
    their_index = {n: i for i, n in enumerate(theirs)}
    mine_at = {n.meta[INDEX]: n for n in gm.graph.nodes if INDEX in n.meta}
    new_flags: dict[Node, dict] = {}
    rewires: list[tuple[Node, tuple, Node]] = []
    problems: list[str] = []
    for node in gm.graph.nodes:
        index = node.meta.get(INDEX)
        if index is None:
            continue  # inserted by the compiler (the HySparse ops and their helpers): dtype-generic
        twin = theirs[index]
        if (twin.op, twin.target) != (node.op, node.target):
            problems.append(f"node {node.name} ({node.target}) is {twin.target} there")
            continue
        mine, there = node_leaves(node), node_leaves(twin)
        if mine.keys() != there.keys():
            problems.append(f"node {node.name} ({node.target}) has other arguments")
            continue
        flags = node.meta.get(FOLLOW, {})
        found = {}
        for path, x in mine.items():
            y, kind = there[path], flags.get(path)
            if isinstance(x, Node) or isinstance(y, Node):
                if isinstance(x, Node) != isinstance(y, Node):
                    problems.append(f"node {node.name} ({node.target}) argument {path[1:]}: {x} vs {y}")
                elif INDEX in x.meta and x.meta[INDEX] != their_index[y]:
                    source = next((n for n in _through_noop_casts(x) if n.meta.get(INDEX) == their_index[y]), None)
                    if source is not None:
                        rewires.append((node, path, source))  # ours read a no-op cast of what the code read
                    elif not any(their_index[n] == x.meta[INDEX] for n in _through_noop_casts(y)):
                        theirs_name = mine_at.get(their_index[y])
                        problems.append(f"node {node.name} ({node.target}) reads {x.name} where the other reads "
                                        f"{theirs_name.name if theirs_name is not None else y.name}")
                continue
            if kind == "device":
                continue  # ours names the current device, theirs the capture device
            if kind is not None:
                if not _equal(y, _value(kind, dtype, info.capture_device)):
                    problems.append(f"node {node.name} ({node.target}) argument {path[1:]}: {y} where the module's "
                                    f"{kind} ({_value(kind, dtype, info.capture_device)}) was expected")
                continue
            if _equal(x, y):
                continue
            if isinstance(x, torch.dtype) and x == info.dtype and y == dtype:
                found[path] = "dtype"
                continue
            field = next((f for f in FINFO_FIELDS if isinstance(x, float) and isinstance(y, float)
                          and x == _finfo(info.dtype, f) and y == _finfo(dtype, f)), None)
            if field is not None:
                found[path] = f"finfo.{field}"
                continue
            problems.append(f"node {node.name} ({node.target}) argument {path[1:]}: {x} vs {y}")
        if found:
            new_flags[node] = found
    return new_flags, rewires, problems


def _equal(x: Any, y: Any) -> bool:
    if type(x) is not type(y):
        return False
    if isinstance(x, float) and x != x:
        return y != y
    try:
        return bool(x == y)
    except Exception:
        return x is y


def retarget(gm: GraphModule, dtype: torch.dtype | None, device: torch.device) -> bool:
    """Rewrite every following constant to (dtype, device); True when the graph changed."""
    info = info_of(gm)
    if info is None or (dtype == info.dtype and device == info.device):
        return False
    changed = 0
    for node in gm.graph.nodes:
        for path, kind in node.meta.get(FOLLOW, {}).items():
            value = _value(kind, dtype, device)
            if value is not None:
                _set_leaf(node, path, value)
                changed += 1
    info.dtype, info.device = dtype, device
    gm.recompile()
    log.info("portable: %d graph constants now name %s on %s", changed, dtype, device)
    return True


def pinned(gm: GraphModule) -> list[str]:
    """Device constants naming the capture device without following the module (for tests and debugging)."""
    info = info_of(gm)
    out = []
    for node in gm.graph.nodes:
        flags = node.meta.get(FOLLOW, {})
        for path, value in node_leaves(node).items():
            if path in flags:
                continue
            if isinstance(value, torch.device) and info is not None and _same_device(value, info.capture_device):
                out.append(f"{node.name}: {path[1:]} = {value}")
    return out
