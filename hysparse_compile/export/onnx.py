"""`to_onnx`: a compiled HySparse model as ONNX (token ids in, logits out; dynamic batch and sequence), optionally
with a decode-step graph and the KV cache as inputs/outputs. Design: docs/export.md; custom nodes: docs/onnx_ops.md.

    >>> from hysparse_compile.export import to_onnx
    >>> result = to_onnx(compiled, ids, "model.onnx")                     # standard ONNX ops, runs in onnxruntime
    >>> result = to_onnx(compiled, ids, "model.onnx", decode=True)        # + model-decode.onnx (onnx_decode.py)
    >>> result = to_onnx(compiled, ids, "model-custom.onnx", ops="custom") # hysparse::FullAttention / SparseAttention
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

from . import onnx_custom, onnx_decode, onnx_standard, program
from .program import ExportResult, Stage

log = logging.getLogger(__name__)

OPS = ("standard", "custom")


def _check_args(ops, decode, opset) -> None:
    if ops not in OPS:
        raise ValueError(f"ops must be 'standard' (standard ONNX ops only, runs in onnxruntime) or 'custom' (one "
                         f"hysparse-domain node per HySparse op), got {ops!r}")
    if not isinstance(decode, bool):
        raise TypeError(f"decode must be True or False, got {decode!r}")
    if opset is not None:
        if isinstance(opset, bool) or not isinstance(opset, int):
            raise TypeError(f"opset must be an int (ONNX opset version) or None, got {opset!r}")
        if opset < onnx_standard.MIN_OPSET:
            raise ValueError(f"opset {opset} is too old: the export needs opset >= {onnx_standard.MIN_OPSET} "
                             f"(ReduceMax with axes as an input, and torch.onnx's translation library, start there); "
                             f"pass opset=None for the default or a value >= {onnx_standard.MIN_OPSET}")


def to_onnx(compiled, example_inputs, path, *, ops: str = "standard", decode: bool = False, opset: int | None = None,
            check: bool = True, stage: Stage | None = None) -> ExportResult:
    """Export a compiled HySparse model to ONNX.

    compiled: the result of `hysparse_compile.compile`. example_inputs: token ids [B, T] (or a tuple / dict with
    `attention_mask`, `position_ids` as the model takes them) to capture with; the file serves any batch and length.
    path: the .onnx file (written to a temporary name and renamed when complete: nothing half-written on error).
    ops: "standard" (only standard ONNX ops; both HySparse ops decomposed — runs in onnxruntime) or "custom" (one
    `hysparse::FullAttention` / `hysparse::SparseAttention` node per op, docs/onnx_ops.md).
    decode: write a prefill graph that also returns the HySparse cache (at `path`) and a decode-step graph that
    takes it and returns it one token longer (at `<stem>-decode.onnx` beside it); see `onnx_decode` for the inputs
    and outputs. With ops='custom' the decode ops are `FullAttentionDecode` / `SparseAttentionDecode` nodes.
    opset: ONNX opset (>= 18; None: torch.onnx's default). check: after writing, run `onnx.checker` (full check) and
    the file(s) on the example inputs (onnxruntime for "standard", `onnx.reference` with
    `onnx_custom.reference_ops()` for "custom") against the compiled model; the logits' error goes to `result.check`.
    Inputs of the file: the compiled model's (`input_ids`, `attention_mask` ...), int64 [batch, seq]; first output
    `logits` [batch, seq, vocab]. Returns an `ExportResult` (path, files, ops per type, check).
    """
    _check_args(ops, decode, opset)
    path = program.check_path(path, ".onnx")
    table = onnx_standard.replacements() if ops == "standard" else onnx_custom.replacements()
    if decode:
        graphs = list(zip(onnx_decode.capture(compiled, example_inputs, table, stage),
                          (path.name, program.decode_path(path.with_suffix(path.suffix or ".onnx")).name)))
    else:
        graphs = [(program.capture(compiled, example_inputs, table, stage), path.name)]
    if stage:
        stage("translate to ONNX (torch.onnx)")
    with program.atomic_output(path) as tmp:
        for prog, name in graphs:
            _write(prog, tmp.parent / name, opset)
        counts = _op_counts(tmp)
        checks = "not checked"
        if check:
            if stage:
                stage("check (onnx.checker, then run the file against the compiled model)")
            checks = "; ".join(_check(prog, tmp.parent / name, ops) for prog, name in graphs)
    files = tuple(f for name in [n for _, n in graphs] for f in program.written_files(path.parent / name))
    result = ExportResult(path, "onnx" if ops == "standard" else "onnx-custom", files, counts, checks)
    log.info("to_onnx: wrote %s (%d bytes, %s)", ", ".join(map(str, files)), result.size, result.check)
    return result


def _write(prog: program.Program, path: Path, opset: int | None) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_program = torch.onnx.export(prog.exported, (), None, dynamo=True, opset_version=opset,
                                         input_names=list(prog.input_names), output_names=list(prog.output_names),
                                         custom_translation_table=onnx_standard.translations(), verbose=False)
    big = sum(t.numel() * t.element_size() for t in prog.exported.state_dict.values()) > 1 << 30
    onnx_program.save(str(path), external_data=big)


def op_counts(model) -> dict:
    """{op: count} over the graph's nodes; custom-domain ops as 'domain::OpType'."""
    counts: dict[str, int] = {}
    for node in model.graph.node:
        name = f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def _op_counts(path: Path) -> dict:
    import onnx

    return op_counts(onnx.load(str(path), load_external_data=False))


def _check(prog: program.Program, path: Path, ops: str) -> str:
    """Full checker, then the file on the program's example inputs against the eager outputs -> a summary."""
    import onnx

    onnx.checker.check_model(str(path), full_check=True)
    custom = {k for k in _op_counts(path) if "::" in k}
    if ops == "standard" and custom:
        raise RuntimeError(f"ops='standard' produced non-standard nodes {sorted(custom)}; please report this")
    if ops == "standard":
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return f"{path.name}: checker ok; onnxruntime not installed, the file was not run"
    run = onnx_standard.run_onnxruntime if ops == "standard" else onnx_custom.run_reference_evaluator
    got = run(path, prog.example)
    if got.shape != prog.logits.shape or not torch.isfinite(got).all():
        raise RuntimeError(f"{path.name} gives logits of shape {tuple(got.shape)} (finite: "
                           f"{bool(torch.isfinite(got).all())}) where the compiled model gives "
                           f"{tuple(prog.logits.shape)}")
    err = program.relative_error(got, prog.logits)
    runner = "onnxruntime" if ops == "standard" else "onnx.reference + hysparse reference ops"
    return f"{path.name}: checker ok; {runner} vs PyTorch: max rel err {err:.1e}"
