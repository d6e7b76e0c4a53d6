"""`ops="standard"`: the HySparse ops as standard ONNX ops only.

The ops are replaced by their ATen decompositions (`decompositions.py`) while the graph is captured; torch.onnx
then translates ATen to ONNX. Two ATen ops need a translation of our own (torch.onnx has none that works here):

- `aten.sort.stable` (the block ranking): ONNX `TopK` over the whole axis. TopK breaks ties toward the lower index,
  which is exactly a stable sort, so the selection keeps docs/design.md's tie rule in every runtime.
- `aten.remainder.Scalar` with a symbolic divisor (the padding roll's `% T`, T the dynamic sequence length): `Mod`
  (integers, sign of the divisor as in torch) or `a - floor(a / b) * b` (floats).

What the ONNX graph computes per layer, in standard ops: full layer — `MatMul` logits, causal `Where`, softmax by
`ReduceLogSumExp`/`Exp`, block scores as a `Gather` of the logits into a [blocks, block_size] grid and `ReduceMax`,
group max `ReduceMax`, `TopK`, `Cast` to int32; sparse layer — a selected-block mask (`ScatterElements` of the
indices, `Gather` to keys, causal `And`), the SWA band mask, sinks in the softmax denominator, sigmoid gates.
"""
from __future__ import annotations

import torch

MIN_OPSET = 18  # torch.onnx's translation library (onnxscript torchlib) starts at opset 18


def _sort_stable(self, *, stable=None, dim: int = -1, descending: bool = False):
    from onnxscript import opset18 as op

    k = op.Shape(self, start=dim) if dim == -1 else op.Shape(self, start=dim, end=dim + 1)
    values, indices = op.TopK(self, k, axis=dim, largest=1 if descending else 0, sorted=1)
    return values, indices


def _remainder_scalar(self, other):
    from onnxscript import opset18 as op

    divisor = op.CastLike(other, self)
    if self.dtype is not None and self.dtype.is_floating_point():
        return op.Sub(self, op.Mul(op.Floor(op.Div(self, divisor)), divisor))
    return op.Mod(self, divisor, fmod=0)


TRANSLATIONS = {
    torch.ops.aten.sort.stable: _sort_stable,
    torch.ops.aten.remainder.Scalar: _remainder_scalar,
}


def translations() -> dict:
    """The custom translation table for torch.onnx: ours, plus the ONNX translations transformers ships for its own
    custom ops (the MoE experts' `transformers::grouped_mm_fallback`, e.g. gpt-oss) and for `aten._grouped_mm`,
    which torch.onnx has none for. transformers keeps that table in a private module
    (`transformers.exporters.exporter_onnx._ONNX_TRANSLATION_TABLE`, transformers >= 5.2x): when it is absent the
    export of such a model fails as it would without us, naming the op."""
    table = dict(TRANSLATIONS)
    try:
        from transformers.exporters import exporter_onnx
    except Exception:  # older transformers, or onnxscript missing there
        return table
    theirs = getattr(exporter_onnx, "_ONNX_TRANSLATION_TABLE", {}) or {}
    grouped = getattr(torch.ops.aten, "_grouped_mm", None)
    for target, fn in theirs.items():
        if str(target).startswith("transformers.") or (grouped is not None and target == grouped.default):
            table.setdefault(target, fn)
    return table


def replacements() -> dict:
    """The capture-time op table for `ops="standard"`: the ATen decompositions."""
    from .decompositions import DECOMPOSITIONS

    return dict(DECOMPOSITIONS)


def run_onnxruntime(path, inputs: dict) -> torch.Tensor:
    """Run an exported file on CPU with onnxruntime: {name: tensor} -> the first output as a torch tensor."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {i.name: inputs[i.name].cpu().numpy() for i in session.get_inputs()}
    return torch.from_numpy(session.run(None, feed)[0])
