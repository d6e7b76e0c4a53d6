"""`compile(model, schedule)` and `from_pretrained(directory)`: the front doors. `compile` runs the pass pipeline and
wraps the rewritten graph in a `HySparseModel` (model.py) whose class has the original's call signature.

    >>> import hysparse_compile as hs
    >>> compiled = hs.compile(model, hs.Schedule.hybrid(4, 3, block_size=16, topk=32))
    >>> out = compiled(input_ids, attention_mask=mask, labels=input_ids)   # HF ModelOutput with .logits, .loss
    >>> out.loss.backward()                                                # reaches original and new weights
"""
from __future__ import annotations

import inspect as pyinspect
import logging
from pathlib import Path

import torch.nn as nn

from . import adapters, checkpoint, passes
from .model import HySparseModel, is_hf_generator
from .passes import capture

log = logging.getLogger(__name__)


def _compiled_class(model: nn.Module, children=()) -> type:
    """A subclass of HySparseModel whose `forward` reports the original's signature, so callers that bind by name
    (torch.export's `dynamic_shapes={"input_ids": ...}`, keyword calls) see the inputs they know. A PEFT model's
    class is named and shaped after the transformers model inside it (`HySparseLlamaForCausalLM`). `children`: the
    names of the graph's top-level submodules; one that a base class defines as an attribute (a compiled PEFT model's
    `base_model`, a `PreTrainedModel` property) is hidden in the class so that the submodule takes the name."""
    model = capture.signature_model(model)
    sig = pyinspect.signature(model.forward)  # bound: no self
    self_param = pyinspect.Parameter("self", pyinspect.Parameter.POSITIONAL_OR_KEYWORD)

    def forward(self, *args, **kwargs):
        return self._run(*args, **kwargs)

    forward.__signature__ = sig.replace(parameters=[self_param, *sig.parameters.values()])
    forward.__doc__ = f"The compiled {type(model).__name__}.forward: same inputs (see HySparseModel)."
    bases = (HySparseModel,)
    if is_hf_generator(model):
        from .runtime.hf import HFGenerationSupport

        bases += (HFGenerationSupport,)
    namespace = {"forward": forward, "__module__": HySparseModel.__module__,
                 "from_pretrained": classmethod(_from_pretrained)}
    for name in children:
        if any(name in vars(base) for cls in bases for base in cls.__mro__):
            namespace[name] = property(_submodule_only(name))
    return type(f"HySparse{type(model).__name__}", bases, namespace)


def _submodule_only(name: str):
    def missing(self):
        raise AttributeError(name)  # nn.Module.__getattr__ then finds the submodule of that name

    return missing


def _check_init_options(options: dict) -> None:
    """gate_init: a finite number or a callable initializer (in place, on the gate weight); sink_init: a finite
    number. Checked before anything is built."""
    import math

    gate_init = options.get("gate_init", 0.0)
    if not callable(gate_init) and (isinstance(gate_init, bool) or not isinstance(gate_init, (int, float))
                                    or not math.isfinite(gate_init)):
        raise TypeError(f"gate_init must be a finite number (the gate weights' value; 0.0 makes both gates 0.5) or "
                        f"a function that initializes the gate weight in place, got {gate_init!r}")
    sink_init = options.get("sink_init", 0.0)
    if isinstance(sink_init, bool) or not isinstance(sink_init, (int, float)) or not math.isfinite(sink_init):
        raise TypeError(f"sink_init must be a finite number (each head's sink logit), got {sink_init!r}")


def compile(model: nn.Module, schedule, *, example_inputs=None, backend: str = "auto", debug_dir=None,
            **options) -> HySparseModel:
    """Compile `model` into a HySparse model following `schedule` (a `Schedule`).

    example_inputs: token ids [B, T] (or a tuple / dict of the model's inputs) to capture with; made from the
    model's config when None. backend: "auto" (picked at run time from the inputs' device), "reference", "flex" or
    "triton". debug_dir: write every pass's graph and the report there. options: `gate_init` (float or an in-place
    initializer, default 0.0 -> both gates 0.5), `sink_init` (float, default 0.0), `save_branches` (bool, default
    False: in training the sparse layers keep only out and the log-sum-exp, like SDPA, and the backward recomputes
    the two branch outputs; True keeps them, two more [B, Hq, T, d] activations per sparse layer for a backward
    without that recomputation; docs/kernels_sparse.md, "Activation memory").
    The original model is not modified; its parameters are shared with the result.
    """
    from .schedule import Schedule

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    inner = next(((name, m) for name, m in model.named_modules() if isinstance(m, HySparseModel)), None)
    if inner is not None:
        where = "" if not inner[0] else f" (at {inner[0]!r} inside the {type(model).__name__} given)"
        raise TypeError(f"model is already a compiled HySparse model{where}: {type(inner[1]).__name__} with "
                        f"schedule {inner[1].schedule.pattern!r}; compile takes the original model (the one passed "
                        f"to hs.compile), not its result. To change the schedule, compile the original again; to "
                        f"reload a saved one, use hs.from_pretrained")
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a hysparse_compile.Schedule (e.g. Schedule.from_pattern('FSSS')), got "
                        f"{type(schedule).__name__}")
    unknown = sorted(set(options) - {"gate_init", "sink_init", "save_branches"})
    if unknown:
        raise TypeError(f"unknown compile option(s) {unknown}; valid options: gate_init, sink_init, save_branches, "
                        f"debug_dir, example_inputs, backend")
    if not isinstance(options.get("save_branches", False), bool):
        raise TypeError(f"save_branches must be True or False, got {options['save_branches']!r}")
    _check_init_options(options)
    state = passes.CompileState(model=model, schedule=schedule, backend=backend, options=dict(options),
                                example_inputs=example_inputs)
    state = passes.run_pipeline(state)
    adapters.restore_module_types(state.gm, model)  # nn.Linear / nn.Embedding holders: PEFT can target them
    compiled = _compiled_class(model, [name for name, _ in state.gm.named_children()])(state)
    adapters.watch(compiled, model)
    state.model = state.example_inputs = None  # the result must not keep the user's model alive
    if debug_dir is not None:
        write_debug(compiled, debug_dir)
    return compiled


def from_pretrained(directory, *, model: nn.Module | None = None, device=None, dtype=None, example_inputs=None,
                    schedule=None) -> HySparseModel:
    """Rebuild a compiled HySparse model written by `compiled.save_pretrained(directory)`.

    model: an instance of the original module (required when the checkpoint has no HF config; for HF models the
        class is rebuilt from `config.json` when None). Its weights are overwritten with the checkpoint's.
    device, dtype: where and in what dtype to build it (default: CPU and the dtype the weights were saved in); the
        model is compiled there, so no move follows.
    example_inputs: passed to `compile` (default: the example shape recorded at save, random token ids).
    schedule: compile with this Schedule instead of the saved one (deliberately: e.g. another window for the same
        weights); by default `schedule.json` is used, and refused if it differs from the schedule recorded with the
        weights in `hysparse.json`.
    Damaged or edited files are refused naming the file and what is wrong (docs/errors.md, "Checkpoints"); the
    format: `hysparse_compile.checkpoint`.
    """
    return checkpoint.load(directory, compile=compile, model=model, device=device, dtype=dtype,
                           example_inputs=example_inputs, schedule=schedule)


def _from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
    """`type(compiled).from_pretrained(directory, ...)` is `hysparse_compile.from_pretrained(directory, ...)` (what
    `PreTrainedModel` users and `transformers.Trainer` call)."""
    return from_pretrained(pretrained_model_name_or_path, *args, **kwargs)


def write_debug(compiled: HySparseModel, debug_dir) -> Path:
    """Write `NN_<pass>.py` (the graph after each pass), `report.txt`, `layers.dot`, `layers.svg`, `report.html`."""
    from .report import inspect

    out = Path(debug_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = inspect(compiled)
    for i, (name, text) in enumerate(report.graphs.items()):
        (out / f"{i:02d}_{name}.py").write_text(text)
    (out / "report.txt").write_text(str(report))
    (out / "layers.dot").write_text(report.to_dot())
    (out / "layers.svg").write_text(report.to_svg())
    (out / "report.html").write_text(report.to_html())
    log.info("compile: wrote %d pass graphs and the report to %s", len(report.graphs), out)
    return out
