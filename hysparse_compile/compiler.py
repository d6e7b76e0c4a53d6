"""`compile(model, schedule)`: the front door. Runs the pass pipeline and wraps the rewritten graph in a module with
the original call signature.

    >>> import hysparse_compile as hs
    >>> compiled = hs.compile(model, hs.Schedule.hybrid(4, 3, block_size=16, topk=32))
    >>> out = compiled(input_ids, attention_mask=mask, labels=input_ids)   # HF ModelOutput with .logits, .loss
    >>> out.loss.backward()                                                # reaches original and new weights
"""
from __future__ import annotations

import inspect as pyinspect
import logging
from pathlib import Path

import torch
import torch.nn as nn

from . import passes
from .passes import capture

log = logging.getLogger(__name__)


class HySparseModel(nn.Module):
    """A compiled HySparse model: call it like the original (`input_ids`, `attention_mask`, `position_ids`,
    `labels`, `use_cache=False`); it returns what the original returns (an HF ModelOutput or a plain tensor).

    Its submodules are those of the captured graph, which hold the original model's parameter tensors (shared, not
    copied) plus the new `*.hysparse.*` gate and sink parameters. `.train()` / `.eval()` set the flags (the graph
    was captured in eval mode: original dropout is not applied). Attributes: `schedule`, `kv_plan`, `config` (when
    the original has one).
    """

    def __init__(self, state: passes.CompileState):
        super().__init__()
        gm = state.gm
        object.__setattr__(self, "_graph_module", gm)  # not a child: state_dict keys stay those of the original
        object.__setattr__(self, "_hysparse_state", state)
        for name, child in gm.named_children():
            if name != "_guards_fn":
                self.add_module(name, child)
        for name, p in gm.named_parameters(recurse=False):
            self.register_parameter(name, p)
        self.schedule, self.kv_plan = state.schedule, state.kv_plan
        self.config = getattr(state.model, "config", None)
        self._token = state.token_name
        self._captured = tuple(state.call_inputs)
        self._dtypes = {k: v.dtype for k, v in state.call_inputs.items() if isinstance(v, torch.Tensor)}
        self._arg_names = tuple(capture.forward_params(state.model))
        loss_fn = getattr(state.model, "loss_function", None) if self.config is not None else None
        object.__setattr__(self, "_loss_function", loss_fn)
        self._vocab = getattr(self.config, "vocab_size", None)
        self.train(state.model.training)

    def _apply(self, fn, recurse=True):
        self._graph_module._apply(fn, recurse=False)  # root-level tensors of the graph follow .to() / .half()
        return super()._apply(fn, recurse)

    def forward(self, *args, **kwargs):
        """Each compiled model's class carries the original forward's signature (see `_compiled_class`)."""
        return self._run(*args, **kwargs)

    def _run(self, *args, **kwargs):
        if len(args) > len(self._arg_names):
            raise TypeError(f"{type(self).__name__} takes at most {len(self._arg_names)} positional inputs "
                            f"{self._arg_names}, got {len(args)}")
        inputs = dict(zip(self._arg_names, args))
        for key, value in kwargs.items():
            if key in inputs:
                raise TypeError(f"got multiple values for argument {key!r}")
            inputs[key] = value
        labels, use_cache = inputs.pop("labels", None), inputs.pop("use_cache", None)
        if use_cache:
            raise NotImplementedError("use_cache=True: the compiled module runs full-sequence forwards; KV-cache "
                                      "decoding is not supported yet (pass use_cache=False)")
        extra = sorted(k for k, v in inputs.items() if v is not None and k not in self._captured)
        if extra:
            raise TypeError(f"input(s) {extra} are not supported by the compiled module; it accepts "
                            f"{[k for k in self._captured if k != 'use_cache'] + ['labels', 'use_cache']}")
        ids = inputs.get(self._token)
        if ids is None:
            raise TypeError(f"missing the token ids {self._token!r}")
        B, T = ids.shape
        call = {self._token: ids}
        if "attention_mask" in self._captured:
            mask = inputs.get("attention_mask")
            if mask is None:
                mask = torch.ones_like(ids)
            elif not (torch.compiler.is_compiling() or torch.compiler.is_exporting()):
                _check_no_holes(mask)
            call["attention_mask"] = mask.to(self._dtypes["attention_mask"])
        if "position_ids" in self._captured:
            pos = inputs.get("position_ids")
            call["position_ids"] = (pos.to(self._dtypes["position_ids"]) if pos is not None
                                    else torch.arange(T, device=ids.device).expand(B, T))
        if "use_cache" in self._captured:
            call["use_cache"] = False
        out = self._graph_module(**call)
        if labels is not None:
            out = self._with_loss(out, labels)
        return out

    def _with_loss(self, out, labels):
        logits = out if isinstance(out, torch.Tensor) else getattr(out, "logits", None)
        if self._loss_function is None or logits is None or isinstance(out, torch.Tensor):
            raise TypeError("labels were given but the original model computes no loss of its own (it has no "
                            "loss_function); compute the loss from the returned logits")
        loss = self._loss_function(logits=logits, labels=labels, vocab_size=self._vocab)
        return type(out)(**{**{k: v for k, v in out.items()}, "loss": loss})

    def extra_repr(self) -> str:
        return f"schedule={self.schedule.pattern!r}, backend={self._hysparse_state.backend!r}"


def _compiled_class(model: nn.Module) -> type:
    """A subclass of HySparseModel whose `forward` reports the original's signature, so callers that bind by name
    (torch.export's `dynamic_shapes={"input_ids": ...}`, keyword calls) see the inputs they know."""
    sig = pyinspect.signature(model.forward)  # bound: no self
    self_param = pyinspect.Parameter("self", pyinspect.Parameter.POSITIONAL_OR_KEYWORD)

    def forward(self, *args, **kwargs):
        return self._run(*args, **kwargs)

    forward.__signature__ = sig.replace(parameters=[self_param, *sig.parameters.values()])
    forward.__doc__ = f"The compiled {type(model).__name__}.forward: same inputs (see HySparseModel)."
    return type(f"HySparse{type(model).__name__}", (HySparseModel,), {"forward": forward,
                                                                      "__module__": HySparseModel.__module__})


def _check_no_holes(mask: torch.Tensor) -> None:
    """Each row must be pads then tokens then pads (no zero between two ones): the padding roll needs it."""
    m = mask.bool().to(torch.int64)  # [B, T]
    starts = (m[:, 1:] > m[:, :-1]).sum(-1) + m[:, 0]  # runs of ones per row
    if bool((starts > 1).any()):
        row = int((starts > 1).nonzero()[0])
        raise ValueError(f"attention_mask row {row} has holes (a 0 between 1s: {mask[row].tolist()}); compiled "
                         f"models take left- or right-padded rows only")


def compile(model: nn.Module, schedule, *, example_inputs=None, backend: str = "auto", debug_dir=None,
            **options) -> HySparseModel:
    """Compile `model` into a HySparse model following `schedule` (a `Schedule`).

    example_inputs: token ids [B, T] (or a tuple / dict of the model's inputs) to capture with; made from the
    model's config when None. backend: "auto" (picked at run time from the inputs' device), "reference", "flex" or
    "triton". debug_dir: write every pass's graph and the report there. options: `gate_init` (float or an in-place
    initializer, default 0.0 -> both gates 0.5), `sink_init` (float, default 0.0).
    The original model is not modified; its parameters are shared with the result.
    """
    from .schedule import Schedule

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a hysparse_compile.Schedule (e.g. Schedule.from_pattern('FSSS')), got "
                        f"{type(schedule).__name__}")
    unknown = sorted(set(options) - {"gate_init", "sink_init"})
    if unknown:
        raise TypeError(f"unknown compile option(s) {unknown}; valid options: gate_init, sink_init, debug_dir, "
                        f"example_inputs, backend")
    state = passes.CompileState(model=model, schedule=schedule, backend=backend, options=dict(options),
                                example_inputs=example_inputs)
    state = passes.run_pipeline(state)
    compiled = _compiled_class(model)(state)
    state.model = state.example_inputs = None  # the result must not keep the user's model alive
    if debug_dir is not None:
        write_debug(compiled, debug_dir)
    return compiled


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
