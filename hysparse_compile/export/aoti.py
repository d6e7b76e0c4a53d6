"""`to_aoti`: a compiled HySparse model as an AOTInductor package (`.pt2`): a shared library plus weights that
`torch._inductor.aoti_load_package` loads and runs without the model's Python code, dynamic batch and sequence.

- CPU: the HySparse ops are replaced by their ATen decompositions (`decompositions.py`) at capture, and Inductor
  compiles the whole graph to C++.
- CUDA: 16-bit models get the Triton kernels of the `triton` backend as `triton_op`s (`aoti_triton.py`), which
  Inductor compiles into the package; other cases get the decompositions.

`decode=True` writes two packages, the prefill that also returns the HySparse cache and the decode step that takes
it and returns it one token longer: the same two graphs, inputs and outputs as `to_onnx(..., decode=True)`
(`onnx_decode.py`). The decode ops run as their ATen decompositions (on CUDA too: Inductor fuses them; the
Triton decode kernels' grids depend on the cache length, which a traced `triton_op` cannot branch on).

    >>> to_aoti(compiled, ids, "model.pt2")                                   # doctest: +SKIP
    >>> runner = torch._inductor.aoti_load_package("model.pt2")               # any process, no hysparse import
    >>> logits = runner(input_ids, attention_mask)                            # doctest: +SKIP
"""
from __future__ import annotations

import functools
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import torch

from . import program
from .program import ExportResult, Stage

log = logging.getLogger(__name__)


KERNELS = ("triton", "aten")
SHARED_CXX_RUNTIME = "libstdc++.so.6"


def _compiler_finds(name: str) -> bool:
    from torch._inductor.cpp_builder import get_cpp_compiler

    return _resolves(get_cpp_compiler(), name)


def compiler_finds(name: str) -> bool:
    """Whether Inductor's C++ compiler resolves library file `name` on its own search path."""
    return _compiler_finds(name)


@functools.lru_cache(maxsize=None)
def _resolves(compiler: str, name: str) -> bool:
    try:
        found = subprocess.run([compiler, f"-print-file-name={name}"], capture_output=True, text=True,
                               timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return False
    return os.path.isabs(found) and os.path.exists(found)  # the bare name back means: not found


def link_configs(configs: dict | None) -> dict:
    """`configs` plus the link flag that keeps the C++ runtime shared: `-l:libstdc++.so.6` (Linux, where the
    compiler resolves that file).

    Why: on the lent H200 (g++ 13.3, Ubuntu 24.04, torch 2.11) the package's .so came out with the static
    `libstdc++.a` linked in and no `libstdc++.so.6` dependency (why that toolchain links it statically is not pinned
    down); loaded into a process that already has the shared runtime, that second copy crashed the loader with a
    segmentation fault (in the locale facets behind the `std::regex` of `parse_device_str`; traced with
    bench/diagnose_aoti.py, docs/export.md). Naming the shared runtime explicitly makes the link that the default
    makes on a usual toolchain, so the flag changes nothing there (tests/export/test_aoti_link.py)."""
    configs = dict(configs or {})
    if sys.platform.startswith("linux") and _compiler_finds(SHARED_CXX_RUNTIME):
        libs = list(configs.get("aot_inductor.custom_op_libs") or [])
        if f":{SHARED_CXX_RUNTIME}" not in libs:
            configs["aot_inductor.custom_op_libs"] = libs + [f":{SHARED_CXX_RUNTIME}"]
    return configs


def replacements(device: torch.device, kernels: str = "triton") -> dict:
    """The capture-time op table for a package on `device`: the Triton prefill kernels on CUDA (kernels="triton"),
    the ATen decompositions for everything else (the decode ops everywhere; every op with kernels="aten")."""
    from .decompositions import DECOMPOSITIONS

    table = dict(DECOMPOSITIONS)
    if device.type == "cuda" and kernels == "triton":
        from . import aoti_triton

        table.update(aoti_triton.replacements())
    return table


def to_aoti(compiled, example_inputs, path, *, decode: bool = False, kernels: str = "triton", check: bool = True,
            inductor_configs: dict | None = None, stage: Stage | None = None) -> ExportResult:
    """Export a compiled HySparse model as an AOTInductor package.

    compiled: the result of `hysparse_compile.compile`, on the device the package is for (CPU or CUDA).
    example_inputs: token ids [B, T] (or a tuple / dict with `attention_mask`, `position_ids` as the model takes
    them). path: the package, ending in `.pt2` (written to a temporary name and renamed when complete).
    decode: also write the decode-step package `<stem>-decode.pt2` (`path` then holds the prefill that returns the
    cache; module docstring). kernels: "triton" (CUDA, 16-bit: the Triton prefill kernels compiled into the
    package) or "aten" (the ATen decompositions everywhere, which Inductor fuses; CPU packages always are).
    check: load the package(s) in this process and compare their outputs on the example
    inputs with the compiled model's (`result.check`). inductor_configs: passed to
    `torch._inductor.aoti_compile_and_package` (with the shared C++ runtime named for the link: `link_configs`).
    The package takes the inputs positionally in the order `input_ids, attention_mask[, position_ids]` (the names
    of the compiled model's inputs) and returns the logits [batch, seq, vocab] (with decode: then the cache).
    """
    path = program.check_path(path, ".pt2")
    if path.suffix != ".pt2":
        raise ValueError(f"path must end in .pt2 (an AOTInductor package), got {str(path)!r}")
    if not isinstance(decode, bool):
        raise TypeError(f"decode must be True or False, got {decode!r}")
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be 'triton' (Triton kernels in CUDA packages) or 'aten' (ATen "
                         f"decompositions), got {kernels!r}")
    if inductor_configs is not None and not isinstance(inductor_configs, dict):
        raise TypeError(f"inductor_configs must be a dict or None, got {type(inductor_configs).__name__}")
    program.check_compiled(compiled)
    device = next(iter(compiled.parameters())).device
    table = replacements(device, kernels)
    if decode:
        from . import onnx_decode

        graphs = list(zip(onnx_decode.capture(compiled, example_inputs, table, stage), (path, program.decode_path(path))))
    else:
        graphs = [(program.capture(compiled, example_inputs, table, stage), path)]
    if stage:
        stage(f"compile with AOTInductor ({device.type}{', 2 packages' if decode else ''})")
    with program.atomic_output(path) as tmp:
        for prog, final in graphs:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch._inductor.aoti_compile_and_package(prog.exported, package_path=str(tmp.parent / final.name),
                                                         inductor_configs=link_configs(inductor_configs))
        check_text = "not checked"
        if check:
            if stage:
                stage("check (load the package, run it against the compiled model)")
            check_text = "; ".join(_check(prog, tmp.parent / final.name) for prog, final in graphs)
    ops: dict[str, int] = {}
    for prog, _ in graphs:
        for op, n in program.graph_op_counts(prog.exported).items():
            ops[op] = ops.get(op, 0) + n
    result = ExportResult(path, "aoti", tuple(final for _, final in graphs), dict(sorted(ops.items())), check_text)
    log.info("to_aoti: wrote %s (%d bytes, %s)", ", ".join(str(f) for _, f in graphs), result.size, result.check)
    return result


def _check(prog: program.Program, package: Path) -> str:
    """Load `package`, run it on the capture's example inputs: the logits' relative error and, for the decode
    graphs, the largest cache error against the compiled model's."""
    runner = torch._inductor.aoti_load_package(str(package))
    with torch.no_grad():
        got = program.as_tuple(runner(*prog.example.values()))
    text = f"{package.name}: aoti_load_package ok; package vs PyTorch: max rel err " \
           f"{program.relative_error(got[0], prog.logits):.1e}"
    if len(got) > 1:  # the cache: lengths equal, K/V to the same tolerance as the logits
        if not torch.equal(got[1].cpu(), prog.reference[1].cpu()):
            text += f" (cache lengths differ: {got[1].tolist()} vs {prog.reference[1].tolist()})"
        else:
            cache = max(program.relative_error(g, w) for g, w in zip(got[2:], prog.reference[2:]))
            text += f", cache {cache:.1e}"
    return text
