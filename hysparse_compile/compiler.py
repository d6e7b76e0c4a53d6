"""`compile(model, schedule)`: the front door. Runs the pass pipeline and wraps the rewritten graph in a module with
the original call signature.

    >>> import hysparse_compile as hs
    >>> compiled = hs.compile(model, hs.Schedule.hybrid(4, 3, block_size=16, topk=32))
    >>> out = compiled(input_ids, attention_mask=mask, labels=input_ids)   # HF ModelOutput with .logits, .loss
    >>> out.loss.backward()                                                # reaches original and new weights
"""
from __future__ import annotations

import copy
import dataclasses
import inspect as pyinspect
import logging
from pathlib import Path

import torch
import torch.nn as nn

from . import adapters, checkpointing, fsdp, passes, training
from .passes import capture
from .runtime import layers as runtime_layers
from .runtime import run as runtime_run

log = logging.getLogger(__name__)


class HySparseModel(training.TrainingSupport, nn.Module):
    """A compiled HySparse model: call it like the original (`input_ids`, `attention_mask`, `position_ids`,
    `labels`, `use_cache=False`, the HF loss arguments `num_items_in_batch` / `ignore_index` / `shift_labels`); it
    returns what the original returns (an HF ModelOutput or a plain tensor).

    Its submodules are those of the captured graph, which hold the original model's parameter tensors (shared, not
    copied) plus the new `*.hysparse.*` gate and sink parameters. `.train()` / `.eval()` set the flags and switch the
    model's dropout (attention-probability dropout excepted: docs/compiler.md, "Dropout"). Attributes: `schedule`,
    `kv_plan`, `config` (when the original has one). Training tools: `gradient_checkpointing_enable()`,
    `get_input_embeddings()`, `num_parameters()` (training.py); an HF model's class is also a `PreTrainedModel`
    with `generate` (runtime/hf.py).
    """

    def __init__(self, state: passes.CompileState):
        nn.Module.__init__(self)  # not super(): an HF model's class is also a PreTrainedModel (runtime/hf.py)
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
        original = capture.signature_model(state.model)  # a PEFT model: the transformers model inside it
        if _is_hf_generator(original):
            self.init_hf(original)
        self._token = state.token_name
        self._captured = tuple(state.call_inputs)
        self._dtypes = {k: v.dtype for k, v in state.call_inputs.items() if isinstance(v, torch.Tensor)}
        self._arg_names = tuple(capture.forward_params(state.model))
        loss_fn = getattr(original, "loss_function", None) if self.config is not None else None
        object.__setattr__(self, "_loss_function", loss_fn)
        self._vocab = getattr(self.config, "vocab_size", None)
        object.__setattr__(self, "_gc", None)  # gradient checkpointing settings (training.py, checkpointing.py)
        object.__setattr__(self, "_checkpointed", None)  # the derived checkpointed graph, built on first use
        self._embeddings = training.embedding_paths(state.model, gm, state.token_name)
        self.train(state.model.training)
        self.register_forward_pre_hook(fsdp.split_sharded_regions)  # per-submodule fully_shard: see fsdp.py

    def _apply(self, fn, recurse=True):
        """`.to(dtype/device)`, `.half()`, `.bfloat16()`, `.float()`, `.cuda()`: the tensors move, and the graph's
        dtype and device constants follow them (passes/portable.py; docs/compiler.md "Dtype and device moves").
        A first move to a new dtype re-exports the original model once to check its casts; if the model's code
        takes another path at that dtype this raises before anything moved."""
        from .passes import portable

        gm = self._graph_module
        target = portable.target_of(gm, fn)
        if target is not None:
            portable.check_dtype(gm, target[0])
        gm._apply(fn, recurse=False)  # root-level tensors of the graph follow .to() / .half()
        result = super()._apply(fn, recurse)
        if target is not None and portable.retarget(gm, *target):
            object.__setattr__(self, "_runtime", None)  # graphs derived from the old constants are stale
        object.__setattr__(self, "_checkpointed", None)  # it read the module's buffers before they moved
        return result

    def __deepcopy__(self, memo):
        """An independent copy: parameters, buffers and the graph are copied (GraphModule's own deepcopy; node
        metadata holds fake tensors, which are shared, not copied); the compile record follows the copied graph."""
        cls = type(self)
        new = cls.__new__(cls)
        memo[id(self)] = new
        gm = copy.deepcopy(self._graph_module, memo)  # fills memo: old node -> new node, old tensor -> new tensor
        for key, value in self.__dict__.items():
            if key == "_hysparse_state":
                value = _copied_state(value, memo)
            elif key in ("_runtime", "_checkpointed"):
                value = None  # derived from the original's graph: rebuilt from the copy's on first use
            elif key == "_graph_module":
                value = gm
            else:
                value = copy.deepcopy(value, memo)
            object.__setattr__(new, key, value)
        return new

    def __reduce_ex__(self, protocol):
        raise TypeError(f"{type(self).__name__} (a compiled HySparse model) cannot be pickled or shallow-copied: its "
                        f"class and graph are made per compile. Save it with compiled.save_pretrained(directory) "
                        f"and load it with hysparse_compile.from_pretrained(directory); copy.deepcopy(compiled) "
                        f"copies it in memory; compiled.state_dict() pickles")

    def save_pretrained(self, save_directory, *, state_dict: dict | None = None, is_main_process: bool = True,
                        safe_serialization: bool = True) -> Path:
        """Write the original config (HF models), `schedule.json`, `hysparse.json` (compile options) and
        `model.safetensors` (every weight of `state_dict()`, gates and sinks included) to `save_directory`;
        `hysparse_compile.from_pretrained(save_directory)` rebuilds the model. See `hysparse_compile.checkpoint`.
        `state_dict` (the weights to write instead of `self.state_dict()`, same keys) and `is_main_process` (False
        writes nothing) are what `transformers.Trainer` passes; only safetensors is written."""
        from .checkpoint import save_pretrained

        if safe_serialization is not True:
            raise ValueError("save_pretrained writes safetensors only (safe_serialization=False is not supported)")
        if not is_main_process:
            return Path(save_directory)
        return save_pretrained(self, save_directory, state_dict=state_dict)

    def forward(self, *args, **kwargs):
        """Each compiled model's class carries the original forward's signature (see `_compiled_class`)."""
        return self._run(*args, **kwargs)

    def _run(self, *args, **kwargs):
        adapters.sync(self)  # modules replaced since compile (get_peft_model on the compiled model) join the graph
        if len(args) > len(self._arg_names):
            raise TypeError(f"{type(self).__name__} takes at most {len(self._arg_names)} positional inputs "
                            f"{self._arg_names}, got {len(args)}")
        inputs = dict(zip(self._arg_names, args))
        for key, value in kwargs.items():
            if key in inputs:
                raise TypeError(f"got multiple values for argument {key!r}")
            inputs[key] = value
        labels, use_cache = inputs.pop("labels", None), inputs.pop("use_cache", None)
        loss_kwargs = {k: v for k in training.LOSS_KWARGS if (v := inputs.pop(k, None)) is not None}
        cache, logits_to_keep = inputs.pop("past_key_values", None), inputs.pop("logits_to_keep", None)
        if inputs.get("cache") is not None or "cache" not in self._captured:  # transformers >= 5.2x names it `cache`
            cache = inputs.pop("cache", None) if cache is None else cache
        inputs.pop("cache_position", None)  # the cache knows its positions (runtime/run.py)
        if inputs.get("return_dict") in (None, True):
            inputs.pop("return_dict", None)
        extra = sorted(k for k, v in inputs.items() if v is not None and k not in self._captured)
        if extra:
            raise TypeError(f"input(s) {extra} are not supported by the compiled module; it accepts "
                            f"{[k for k in self._captured if k != 'use_cache']} + ['labels', 'use_cache', "
                            f"'past_key_values' (or 'cache'), 'logits_to_keep', 'cache_position', "
                            f"{', '.join(repr(k) for k in training.LOSS_KWARGS)}]")
        ids = inputs.get(self._token)
        if ids is None:
            raise TypeError(f"missing the token ids {self._token!r}")
        cached = bool(use_cache) or cache is not None
        B, T = ids.shape
        call = {self._token: ids}
        unpadded = True  # no padding in this call: the graph's padding rolls are skipped (runtime.layers.unpadded)
        if "attention_mask" in self._captured:
            mask = inputs.get("attention_mask")
            tracing = (torch.compiler.is_compiling() or torch.compiler.is_exporting()
                       or (ids.is_cuda and torch.cuda.is_current_stream_capturing()))
            if mask is not None:
                unpadded = False if tracing else bool(mask.bool().all())  # a traced graph must serve padding
                if not tracing and not unpadded:
                    _check_no_holes(mask)
            elif not cached:
                mask = torch.ones_like(ids)
            call["attention_mask"] = None if mask is None else mask.to(self._dtypes["attention_mask"])
        if "position_ids" in self._captured:
            pos = inputs.get("position_ids")
            if pos is not None:
                pos = pos.to(self._dtypes["position_ids"])
            elif not cached:
                pos = torch.arange(T, device=ids.device).expand(B, T)
            call["position_ids"] = pos
        if "use_cache" in self._captured:
            call["use_cache"] = False
        if cached:
            if cache is None and self.config is None:
                raise TypeError("use_cache=True on a plain (non-HF) model: pass the cache to fill, "
                                "past_key_values=hs.HySparseCache(compiled), or use hs.generate(compiled, ids, ...)")
            call, cache, step = runtime_run.prepare(self, call, cache, self._token)
            with runtime_layers.step(step), runtime_layers.unpadded(unpadded):
                out = self._graph_module(**call)
            runtime_run.finish(step, T)
            out = runtime_run.with_cache(out, cache)
        else:
            gc = self.__dict__.get("_gc")
            with runtime_layers.unpadded(unpadded):
                if gc is not None and self.training and torch.is_grad_enabled():
                    out = checkpointing.run(self, call, gc)  # each decoder layer under torch.utils.checkpoint
                else:
                    out = self._graph_module(**call)
        out = runtime_run.keep_logits(out, logits_to_keep)
        if labels is not None:
            out = self._with_loss(out, labels, loss_kwargs)
        return out

    def _with_loss(self, out, labels, loss_kwargs):
        logits = out if isinstance(out, torch.Tensor) else getattr(out, "logits", None)
        if self._loss_function is None or logits is None or isinstance(out, torch.Tensor):
            raise TypeError("labels were given but the original model computes no loss of its own (it has no "
                            "loss_function); compute the loss from the returned logits")
        loss = self._loss_function(logits=logits, labels=labels, vocab_size=self._vocab, **loss_kwargs)
        return type(out)(**{**{k: v for k, v in out.items()}, "loss": loss})

    def extra_repr(self) -> str:
        return f"schedule={self.schedule.pattern!r}, backend={self._hysparse_state.backend!r}"


def _copied_state(state, memo):
    """The compile record of a deep copy: nodes, parameters and modules mapped to their copies (Graph's deepcopy
    puts old node -> new node in `memo`; tensors and modules are keyed by id); erased nodes and plain values are
    shared; tensors not yet copied (example inputs) are copied."""
    def remap(value, depth=0):
        if isinstance(value, torch.fx.Node):
            return memo.get(value, value)
        if isinstance(value, (torch.Tensor, nn.Module)):
            if id(value) in memo:
                return memo[id(value)]
            return copy.deepcopy(value, memo) if isinstance(value, torch.Tensor) else value
        if depth > 4:
            return value
        if type(value) in (list, tuple):
            return type(value)(remap(v, depth + 1) for v in value)
        if type(value) is dict:
            return {k: remap(v, depth + 1) for k, v in value.items()}
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
            mapped = {k: remap(v, depth + 1) for k, v in fields.items()}
            if all(mapped[k] is fields[k] for k in fields):
                return value
            out = copy.copy(value)
            for k, v in mapped.items():
                object.__setattr__(out, k, v)
            return out
        return value

    return remap(state)


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
    if _is_hf_generator(model):
        from .runtime.hf import HFGenerationSupport

        bases += (HFGenerationSupport,)
    namespace = {"forward": forward, "__module__": HySparseModel.__module__}
    for name in children:
        if any(name in vars(base) for cls in bases for base in cls.__mro__):
            namespace[name] = property(_submodule_only(name))
    return type(f"HySparse{type(model).__name__}", bases, namespace)


def _submodule_only(name: str):
    def missing(self):
        raise AttributeError(name)  # nn.Module.__getattr__ then finds the submodule of that name

    return missing


def _is_hf_generator(model: nn.Module) -> bool:
    """An HF model that `generate`s (a transformers GenerationMixin with a config)."""
    try:
        from transformers import GenerationMixin
    except Exception:
        return False
    return isinstance(model, GenerationMixin) and getattr(model, "config", None) is not None


def _check_no_holes(mask: torch.Tensor) -> None:
    """Each row must be pads then tokens then pads (no zero between two ones): the padding roll needs it."""
    m = mask.bool().to(torch.int64)  # [B, T]
    starts = (m[:, 1:] > m[:, :-1]).sum(-1) + m[:, 0]  # runs of ones per row
    if bool((starts > 1).any()):
        row = int((starts > 1).nonzero()[0])
        raise ValueError(f"attention_mask row {row} has holes (a 0 between 1s: {mask[row].tolist()}); compiled "
                         f"models take left- or right-padded rows only")


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
    object.__setattr__(compiled, "_slots", adapters.slots(compiled))
    object.__setattr__(compiled, "_peft_before", adapters.record_before_compile(model))
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
