"""`HySparseModel`: the module `hs.compile` returns. It runs the rewritten graph with the original model's call
signature (HF outputs and losses included), serves KV-cache calls through the runtime (runtime/run.py), follows
dtype and device moves (graph/portable.py), and offers the accessors the rest of the package reads (see the class).

    >>> compiled = hs.compile(model, hs.Schedule.hybrid(4, 3, block_size=16, topk=32))
    >>> out = compiled(input_ids, attention_mask=mask, labels=input_ids)   # HF ModelOutput with .logits, .loss
    >>> out.loss.backward()                                                # reaches original and new weights
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses

import torch
import torch.nn as nn

from . import adapters, checkpoint, checkpointing, fsdp, passes, training
from .graph import portable
from .passes import capture
from .runtime import run as runtime_run
from .runtime import state as runtime_state


class HySparseModel(training.TrainingSupport, checkpoint.CheckpointSupport, nn.Module):
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
        if is_hf_generator(original):
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
        object.__setattr__(self, "adapter_watch", None)  # adapters.Watch: what adapters.sync watches
        self._embeddings = training.embedding_paths(state.model, gm, state.token_name)
        self.train(state.model.training)
        self.register_forward_pre_hook(fsdp.split_sharded_regions)  # per-submodule fully_shard: see fsdp.py

    # ------------------------------------------------------------------------------------------- accessors
    @property
    def graph_module(self) -> torch.fx.GraphModule:
        """The rewritten graph this model runs (its submodules are this model's)."""
        return self._graph_module

    @property
    def compile_state(self) -> passes.CompileState:
        """The passes' record of this compile (sites, specs, options, graphs after each pass); read-only."""
        return self._hysparse_state

    @property
    def attention_sites(self) -> tuple:
        """The attention sites the compiler found (`find_attention.AttentionSite`), in layer order."""
        return tuple(self._hysparse_state.sites)

    @property
    def options(self) -> dict:
        """The compile options (`gate_init`, `sink_init`, `save_branches`)."""
        return dict(self._hysparse_state.options)

    @property
    def backend(self) -> str:
        return self._hysparse_state.backend

    @property
    def token_name(self) -> str:
        """The name of the token-ids input (`input_ids`, `idx`, ...)."""
        return self._token

    @property
    def graph_inputs(self) -> tuple[str, ...]:
        """The inputs the captured graph takes, in order (the token ids, `attention_mask`, `position_ids`, ...)."""
        return self._captured

    @property
    def input_dtypes(self) -> dict:
        """The dtype of each tensor input the graph was captured with."""
        return dict(self._dtypes)

    @property
    def call_state(self) -> runtime_state.CallState:
        """The call in progress of this model, per thread (runtime/state.py)."""
        return runtime_state.of(self._graph_module)

    @property
    def checkpointed_graph(self):
        """The derived graph gradient checkpointing runs (checkpointing.py), None until built or after a move."""
        return self.__dict__.get("_checkpointed")

    @checkpointed_graph.setter
    def checkpointed_graph(self, value) -> None:
        object.__setattr__(self, "_checkpointed", value)

    @contextlib.contextmanager
    def graph_runner(self, runner):
        """Within the block the model calls `runner(**graph_inputs)` in place of its graph module, e.g.
        `torch.compile(compiled.graph_module)`: benchmarks time the graph compiled alone, the Python around it
        eager. Everything else (inputs, caches, losses) is unchanged."""
        previous = self.__dict__.get("_runner")
        object.__setattr__(self, "_runner", runner)
        try:
            yield self
        finally:
            object.__setattr__(self, "_runner", previous)

    def graph_kwargs(self, ids: torch.Tensor, attention_mask=None, position_ids=None) -> dict:
        """The graph's inputs for token ids [B, T] (an all-ones mask and `arange` positions where the graph takes
        them and none are given), cast to the dtypes the graph was captured with; `use_cache` False."""
        call = {self._token: ids}
        if "attention_mask" in self._captured:
            mask = torch.ones_like(ids) if attention_mask is None else attention_mask
            call["attention_mask"] = mask.to(self._dtypes["attention_mask"])
        if "position_ids" in self._captured:
            B, T = ids.shape
            pos = torch.arange(T, device=ids.device).expand(B, T) if position_ids is None else position_ids
            call["position_ids"] = pos.to(self._dtypes["position_ids"])
        if "use_cache" in self._captured:
            call["use_cache"] = False
        return call

    def _apply(self, fn, recurse=True):
        """`.to(dtype/device)`, `.half()`, `.bfloat16()`, `.float()`, `.cuda()`: the tensors move, and the graph's
        dtype and device constants follow them (graph/portable.py; docs/compiler.md "Dtype and device moves").
        A first move to a new dtype re-exports the original model once to check its casts; if the model's code
        takes another path at that dtype this raises before anything moved. Graphs derived from this one (the
        checkpointed graph) are dropped when anything moved."""
        gm = self._graph_module
        target = portable.target_of(gm, fn)
        if target is not None:
            portable.check_dtype(gm, target[0])
        before = _placement(self, gm)
        gm._apply(fn, recurse=False)  # root-level tensors of the graph follow .to() / .half()
        result = super()._apply(fn, recurse)
        moved = target is not None and portable.retarget(gm, *target)
        if moved or _placement(self, gm) != before:
            object.__setattr__(self, "_checkpointed", None)  # it read the constants and buffers before they moved
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
            elif key == "_checkpointed":
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
        unpadded = True  # no padding in this call: the graph's padding rolls are skipped (CallState.unpadded)
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
            with self.call_state.step(step), self.call_state.unpadded(unpadded):
                out = self._graph(**call)
            runtime_run.finish(step, T)
            out = runtime_run.with_cache(out, cache)
        else:
            gc = self.__dict__.get("_gc")
            with self.call_state.unpadded(unpadded):
                if gc is not None and self.training and torch.is_grad_enabled():
                    out = checkpointing.run(self, call, gc)  # each decoder layer under torch.utils.checkpoint
                else:
                    out = self._graph(**call)
        out = runtime_run.keep_logits(out, logits_to_keep)
        if labels is not None:
            out = self._with_loss(out, labels, loss_kwargs)
        return out

    @property
    def _graph(self):
        runner = self.__dict__.get("_runner")  # not `or`: a torch.compile'd module raises on truth testing (len)
        return self._graph_module if runner is None else runner

    def _with_loss(self, out, labels, loss_kwargs):
        logits = out if isinstance(out, torch.Tensor) else getattr(out, "logits", None)
        if self._loss_function is None or logits is None or isinstance(out, torch.Tensor):
            raise TypeError("labels were given but the original model computes no loss of its own (it has no "
                            "loss_function); compute the loss from the returned logits")
        loss = self._loss_function(logits=logits, labels=labels, vocab_size=self._vocab, **loss_kwargs)
        return type(out)(**{**{k: v for k, v in out.items()}, "loss": loss})

    def extra_repr(self) -> str:
        return f"schedule={self.schedule.pattern!r}, backend={self.backend!r}"


def _placement(model: nn.Module, gm: torch.fx.GraphModule) -> tuple:
    """Where every tensor of the model and its graph lives: (id, data_ptr, dtype, device) each."""
    tensors = [*model.parameters(), *model.buffers(), *(v for v in vars(gm).values() if isinstance(v, torch.Tensor))]
    return tuple((id(t), t.data_ptr(), t.dtype, t.device) for t in tensors)


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


def _check_no_holes(mask: torch.Tensor) -> None:
    """Each row must be pads then tokens then pads (no zero between two ones): the padding roll needs it."""
    m = mask.bool().to(torch.int64)  # [B, T]
    starts = (m[:, 1:] > m[:, :-1]).sum(-1) + m[:, 0]  # runs of ones per row
    if bool((starts > 1).any()):
        row = int((starts > 1).nonzero()[0])
        raise ValueError(f"attention_mask row {row} has holes (a 0 between 1s: {mask[row].tolist()}); compiled "
                         f"models take left- or right-padded rows only")


def is_hf_generator(model: nn.Module) -> bool:
    """An HF model that `generate`s (a transformers GenerationMixin with a config)."""
    try:
        from transformers import GenerationMixin
    except Exception:
        return False
    return isinstance(model, GenerationMixin) and getattr(model, "config", None) is not None
