"""What every export format starts from: checked arguments, the compiled model behind a tensors-in/logits-out
interface, one `torch.export` capture with dynamic batch and sequence axes, and atomic file writes.

The HySparse ops are replaced *while the graph is captured* (`replace_ops`): a format passes a table
`{torch.ops.hysparse.<op>.default: fn}` (the ATen decompositions, custom-domain ONNX nodes, Triton kernels), and the
captured program holds `fn`'s ops in place of the custom op. This is the same substitution as
`ep.run_decompositions(table)`, done in the one trace instead of a second one (a retrace costs as much as the
capture: seconds per layer on a CPU).

    >>> prog = capture(compiled, {"input_ids": ids}, DECOMPOSITIONS)       # doctest: +SKIP
    >>> prog.exported.graph_signature.user_inputs, prog.input_names        # doctest: +SKIP
    (['input_ids'], ('input_ids',))
"""
from __future__ import annotations

import contextlib
import inspect as pyinspect
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn as nn
from torch.export import Dim
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

Stage = Callable[[str], None]  # progress callback: called with a short description of each stage


@dataclass(frozen=True)
class ExportResult:
    """What an exporter wrote. `path` is the main file; `files` every file written (external data too); `ops` the
    node count per op of the exported graph (ONNX: `domain::OpType`, standard domain without prefix); `check` what
    was verified after writing (e.g. "m.onnx: checker ok; onnxruntime vs PyTorch: max rel err 3.1e-07")."""

    path: Path
    format: str
    files: tuple[Path, ...]
    ops: dict = field(default_factory=dict)
    check: str = "not checked"

    @property
    def size(self) -> int:
        """Bytes on disk, all files together."""
        return sum(f.stat().st_size for f in self.files if f.exists())

    def __fspath__(self) -> str:
        return str(self.path)


@dataclass
class Program:
    """A captured graph: `exported` (ExportedProgram with inputs `input_names`, outputs `output_names`, the logits
    first), the example inputs it was captured with, and the eager outputs on them (`reference`, same order)."""

    exported: torch.export.ExportedProgram
    input_names: tuple[str, ...]
    example: dict
    reference: tuple
    module: nn.Module
    output_names: tuple[str, ...] = ("logits",)

    @property
    def logits(self) -> torch.Tensor:
        return self.reference[0]


# ---------------------------------------------------------------------------------------------- arguments
def check_compiled(compiled) -> None:
    from ..compiler import HySparseModel

    if not isinstance(compiled, HySparseModel):
        kind = type(compiled).__name__
        hint = (" (compile it first: compiled = hysparse_compile.compile(model, schedule))"
                if isinstance(compiled, nn.Module) else "")
        raise TypeError(f"compiled must be a compiled HySparse model (the result of hysparse_compile.compile), got "
                        f"{kind}{hint}")


def input_names(compiled) -> tuple[str, ...]:
    """The graph inputs a compiled model takes: its token ids first, then attention_mask / position_ids if captured."""
    token = compiled.token_name
    return (token,) + tuple(n for n in ("attention_mask", "position_ids") if n in compiled.graph_inputs)


def normalize_inputs(compiled, example_inputs, *, positions: bool = False) -> dict:
    """example_inputs (token ids [B, T], a tuple in input order, or a dict) -> {name: tensor}, checked against the
    compiled model; raises naming `example_inputs` and what would be valid. The exported graph takes the token ids,
    `attention_mask` when the model takes one (all ones if not given: batches of different lengths need it) and
    `position_ids` when given (or, with `positions=True`, always when the model takes them: arange(T) if not
    given)."""
    names = input_names(compiled)
    if isinstance(example_inputs, torch.Tensor):
        inputs = {names[0]: example_inputs}
    elif isinstance(example_inputs, (tuple, list)):
        if not 1 <= len(example_inputs) <= len(names):
            raise ValueError(f"example_inputs: the compiled model takes {list(names)}, got {len(example_inputs)} "
                             f"positional inputs")
        inputs = dict(zip(names, example_inputs))
    elif isinstance(example_inputs, dict):
        unknown = sorted(set(example_inputs) - set(names))
        if unknown:
            raise ValueError(f"example_inputs: unknown input(s) {unknown}; the compiled model takes {list(names)}")
        inputs = {k: v for k, v in example_inputs.items() if v is not None}
    else:
        raise TypeError(f"example_inputs must be token ids [batch, seq_len] (a tensor), a tuple or a dict of "
                        f"{list(names)}, got {type(example_inputs).__name__}")
    ids = inputs.get(names[0])
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point() or ids.is_complex():
        got = f"{ids.dtype} of shape {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"example_inputs: {names[0]!r} must be integer token ids of shape [batch, seq_len], got "
                         f"{got}")
    device = next(iter(compiled.parameters())).device
    for name, x in inputs.items():
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != tuple(ids.shape):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"example_inputs: {name!r} must have the shape of {names[0]!r} {tuple(ids.shape)}, "
                             f"got {shape}")
        if x.device != device:
            raise ValueError(f"example_inputs: {name!r} is on {x.device} but the compiled model is on {device}")
    if "attention_mask" in names and "attention_mask" not in inputs:
        inputs["attention_mask"] = torch.ones_like(ids)
    if positions and "position_ids" in names and "position_ids" not in inputs:
        inputs["position_ids"] = torch.arange(ids.shape[1], device=ids.device).expand_as(ids).contiguous()
    return widened({name: inputs[name] for name in names if name in inputs})


def widened(inputs: dict) -> dict:
    """The example with its batch and sequence axes at least 2: torch.export specializes an axis whose example size
    is 0 or 1 to that constant, so a batch-1 example (one prompt, the most common export call) would give a file
    that only serves batch 1. A batch-1 example is captured with its row repeated; a 1-token example with its last
    column repeated (position ids counting on). The file serves every batch and length either way."""
    first = next(iter(inputs.values()))
    B, T = first.shape
    if B == 1:
        log.info("export: the example has batch 1; captured with its row repeated (torch.export would otherwise "
                 "fix the batch at 1)")
        inputs = {k: x.expand(2, -1).contiguous() for k, x in inputs.items()}
    if T == 1:
        log.info("export: the example has 1 token; captured with 2 (torch.export would otherwise fix the length)")
        inputs = {k: torch.cat([x, x[:, -1:] + (1 if k == "position_ids" else 0)], 1) for k, x in inputs.items()}
    return inputs


def check_path(path, suffix: str | None = None) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a file path (str or os.PathLike), got {type(path).__name__}")
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"path {str(path)!r} is a directory; give a file name such as {str(path / 'model')}"
                         f"{suffix or ''}")
    if not path.parent.exists():
        raise ValueError(f"path {str(path)!r}: the folder {str(path.parent)!r} does not exist")
    if not os.access(path.parent, os.W_OK | os.X_OK):  # checked again when writing (atomic_output)
        raise PermissionError(f"path {str(path)!r}: cannot write into the folder {str(path.parent)!r} (no write "
                              f"permission); choose a folder you can write to")
    return path


# ---------------------------------------------------------------------------------------------- capture
class _Logits(nn.Module):
    """The compiled model as tensors in, logits out (what a runtime without Python objects can call)."""

    def __init__(self, compiled, names: tuple[str, ...]):
        super().__init__()
        self.model, self.names = compiled, names

    def forward(self, *tensors):
        out = self.model(**dict(zip(self.names, tensors)))
        return out if isinstance(out, torch.Tensor) else out.logits


def logits_module(compiled, names: tuple[str, ...]) -> nn.Module:
    """`_Logits` whose forward signature names the inputs (graph placeholders, ONNX input names follow it)."""
    params = [pyinspect.Parameter(n, pyinspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names]

    def forward(self, *tensors):
        return _Logits.forward(self, *tensors)

    forward.__signature__ = pyinspect.Signature([pyinspect.Parameter("self", pyinspect.Parameter.POSITIONAL_ONLY),
                                                 *params])
    cls = type("HySparseLogits", (_Logits,), {"forward": forward})
    return cls(compiled, names)


class replace_ops(TorchFunctionMode):
    """While active, calls to the custom ops in `table` (`{torch.ops.hysparse.x.default: fn}`) run `fn` instead, so
    a graph captured under it holds `fn`'s ops. Packet calls (`torch.ops.hysparse.x(...)`) are matched too."""

    def __init__(self, table: dict):
        super().__init__()
        self.table = table

    def __torch_function__(self, func, types, args=(), kwargs=None):
        fn = self.table.get(getattr(func, "default", func))
        return fn(*args, **(kwargs or {})) if fn is not None else func(*args, **(kwargs or {}))


BATCH, SEQ = Dim("batch", min=1), Dim("seq", min=1)


def dynamic_shapes(names: tuple[str, ...]) -> dict:
    """Every input [batch, seq]: both axes dynamic from 1 up."""
    return {name: {0: BATCH, 1: SEQ} for name in names}


def as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


@contextlib.contextmanager
def eval_mode(compiled):
    """The compiled model in eval mode, no grad, its training flag restored afterwards."""
    was_training = compiled.training
    compiled.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        compiled.train(was_training)


def run_example(module: nn.Module, inputs: dict) -> tuple:
    """The module's eager outputs on the example inputs; a failure is the example's fault (named as such)."""
    try:
        return as_tuple(module(*inputs.values()))
    except Exception as e:
        raise ValueError(f"example_inputs do not run through the compiled model ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); give token ids the model accepts, "
                         f"e.g. torch.randint(0, vocab_size, (2, 64))") from e


def _relaxed(dims):
    """The same dynamic-axes structure with every named Dim replaced by Dim.DYNAMIC."""
    if isinstance(dims, dict):
        return {k: _relaxed(v) for k, v in dims.items()}
    if isinstance(dims, (tuple, list)):
        return type(dims)(_relaxed(v) for v in dims)
    return Dim.DYNAMIC if dims is not None else None


def capture_module(module: nn.Module, inputs: dict, dims, table: dict, reference: tuple,
                   output_names: tuple[str, ...] = ("logits",)) -> Program:
    """torch.export `module` on `inputs` (dynamic axes `dims`: named Dims from 1 up), HySparse ops replaced per
    `table`. The named Dims prove that one graph serves every size from 1; when torch's symbolic reasoning cannot
    prove a guard it adds (seen with torch 2.11 on CUDA: `min(64*T, 256*T) == 64*T`), the capture is retried with
    `Dim.DYNAMIC`, which accepts such guards (the graph is then traced for sizes >= 2, which in practice serves 1)."""
    from torch._dynamo.exc import UserError, UserErrorType

    args = tuple(inputs.values())
    with replace_ops(table):
        try:
            exported = torch.export.export(module, args, dynamic_shapes=dims, strict=False)
        except UserError as e:
            if e.error_type is not UserErrorType.CONSTRAINT_VIOLATION:
                raise
            log.warning("export: torch.export could not prove a guard for every size (%s); captured again with "
                        "Dim.DYNAMIC", str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e)
            exported = torch.export.export(module, args, dynamic_shapes=_relaxed(dims), strict=False)
    log.info("export: captured %d graph nodes, inputs %s", len(exported.graph.nodes), list(inputs))
    return Program(exported, tuple(inputs), inputs, reference, module, output_names)


def capture(compiled, example_inputs, table: dict, stage: Stage | None = None) -> Program:
    """Check the arguments, run the compiled model once on the example inputs (the reference output), and capture
    it with torch.export (batch and sequence dynamic, HySparse ops replaced per `table`)."""
    check_compiled(compiled)
    inputs = normalize_inputs(compiled, example_inputs)
    module = logits_module(compiled, tuple(inputs))
    with eval_mode(compiled):
        reference = run_example(module, inputs)
        if stage:
            stage("capture (torch.export, dynamic batch and sequence)")
        return capture_module(module, inputs, dynamic_shapes(tuple(inputs)), table, reference)


def graph_op_counts(exported) -> dict:
    """Node count per call_function target of an ExportedProgram."""
    counts: dict[str, int] = {}
    for node in exported.graph.nodes:
        if node.op == "call_function":
            name = str(getattr(node.target, "__name__", node.target))
            counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (in float64)."""
    got, want = got.double(), want.double()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------- atomic writes
@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write to; on success every file written there (the main file and
    anything beside it with the same stem, e.g. `model.onnx.data`) is renamed into place, on failure nothing is."""
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    except OSError as e:
        raise PermissionError(f"path {str(path)!r}: cannot write into the folder {str(path.parent)!r} "
                              f"({type(e).__name__}: {e.strerror or e}); choose a folder you can write to") from e
    try:
        yield tmp / path.name
        written = sorted(tmp.iterdir(), key=lambda f: f.name == path.name)  # main file last
        for f in written:
            os.replace(f, path.parent / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def decode_path(path: Path) -> Path:
    """Where an exporter with `decode=True` writes the decode-step graph: `<stem>-decode<suffix>` beside `path`."""
    return path.with_name(f"{path.stem}-decode{path.suffix}")


def written_files(path: Path) -> tuple[Path, ...]:
    """The main file and its companions (`<name>.data`, external weights) that exist."""
    extra = sorted(p for p in path.parent.glob(f"{path.name}.*") if p.is_file())
    return (path, *extra)
