"""`to_aoti`: a compiled HySparse model as an AOTInductor package (`.pt2`): a shared library plus weights that
`torch._inductor.aoti_load_package` loads and runs without the model's Python code, dynamic batch and sequence.

- CPU: the HySparse ops are replaced by their ATen decompositions (`decompositions.py`) at capture, and Inductor
  compiles the whole graph to C++.
- CUDA: 16-bit models get the Triton kernels of the `triton` backend as `triton_op`s (`aoti_triton.py`), which
  Inductor compiles into the package; other cases get the decompositions.

    >>> to_aoti(compiled, ids, "model.pt2")                                   # doctest: +SKIP
    >>> runner = torch._inductor.aoti_load_package("model.pt2")               # any process, no hysparse import
    >>> logits = runner(input_ids, attention_mask)                            # doctest: +SKIP
"""
from __future__ import annotations

import logging
import warnings

import torch

from . import program
from .program import ExportResult, Stage

log = logging.getLogger(__name__)


def replacements(device: torch.device) -> dict:
    """The capture-time op table for a package on `device`."""
    if device.type == "cuda":
        from . import aoti_triton

        return aoti_triton.replacements()
    from .decompositions import DECOMPOSITIONS

    return dict(DECOMPOSITIONS)


def to_aoti(compiled, example_inputs, path, *, check: bool = True, inductor_configs: dict | None = None,
            stage: Stage | None = None) -> ExportResult:
    """Export a compiled HySparse model as an AOTInductor package.

    compiled: the result of `hysparse_compile.compile`, on the device the package is for (CPU or CUDA).
    example_inputs: token ids [B, T] (or a tuple / dict with `attention_mask`, `position_ids` as the model takes
    them). path: the package, ending in `.pt2` (written to a temporary name and renamed when complete).
    check: load the package in this process and compare its logits on the example inputs with the compiled model's
    (`result.check`). inductor_configs: passed to `torch._inductor.aoti_compile_and_package`.
    The package takes the inputs positionally in the order `input_ids, attention_mask[, position_ids]` (the names
    of the compiled model's inputs) and returns the logits [batch, seq, vocab].
    """
    path = program.check_path(path, ".pt2")
    if path.suffix != ".pt2":
        raise ValueError(f"path must end in .pt2 (an AOTInductor package), got {str(path)!r}")
    if inductor_configs is not None and not isinstance(inductor_configs, dict):
        raise TypeError(f"inductor_configs must be a dict or None, got {type(inductor_configs).__name__}")
    program.check_compiled(compiled)
    device = next(iter(compiled.parameters())).device
    prog = program.capture(compiled, example_inputs, replacements(device), stage)
    if stage:
        stage(f"compile with AOTInductor ({device.type})")
    with program.atomic_output(path) as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch._inductor.aoti_compile_and_package(prog.exported, package_path=str(tmp),
                                                     inductor_configs=dict(inductor_configs or {}))
        check_text = "not checked"
        if check:
            if stage:
                stage("check (load the package, run it against the compiled model)")
            runner = torch._inductor.aoti_load_package(str(tmp))
            with torch.no_grad():
                got = runner(*prog.example.values())
            check_text = f"aoti_load_package ok; package vs PyTorch: max rel err " \
                         f"{program.relative_error(got, prog.logits):.1e}"
    ops = {k: v for k, v in program.graph_op_counts(prog.exported).items()}
    result = ExportResult(path, "aoti", (path,), ops, check_text)
    log.info("to_aoti: wrote %s (%d bytes, %s)", path, result.size, result.check)
    return result
