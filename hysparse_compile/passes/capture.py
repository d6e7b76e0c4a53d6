"""Pass 1 — capture: `torch.export` (non-strict, training IR) with dynamic batch and sequence axes.

The graph takes the token ids plus, when the model's forward accepts them, `attention_mask`, `position_ids` and
`use_cache=False`, so one graph serves every call the compiled module accepts (defaults are filled in by the module,
see `compiler.HySparseModel`). The model is captured in eval mode (its training flags are restored afterwards).
A PEFT model (`get_peft_model(model, LoraConfig(...))`, whose forward is `*args, **kwargs`) is captured whole — its
adapter layers trace into the graph — with the inputs of the transformers model inside it (`signature_model`).
The graph is then made portable across dtypes and devices (`portable.prepare`: metadata asserts dropped, device
constants marked, a parameter-free copy of the model kept for dtype checks), and the model's dropout is made to
follow the compiled module's `.train()` / `.eval()` (`switchable_dropout`).
"""
from __future__ import annotations

import inspect as pyinspect
import logging

import torch
import torch.nn as nn
from torch.export import Dim

from ..graph import portable

log = logging.getLogger(__name__)

DEFAULT_SEQ_LEN = 32  # tokens in a generated example (small: the capture and the mask probe run on it)
OPTIONAL_INPUTS = ("attention_mask", "position_ids")


def is_peft(model: nn.Module) -> bool:
    """A PEFT `PeftModel` (LoRA and other adapters): it wraps a model and forwards `*args, **kwargs` to it."""
    return callable(getattr(model, "get_base_model", None)) and hasattr(model, "peft_config")


def signature_model(model: nn.Module) -> nn.Module:
    """The module whose forward names the inputs of `model`: the model itself, or for a PEFT model the model inside
    it (`peft_model.get_base_model()`, e.g. the LlamaForCausalLM carrying the LoRA layers)."""
    return model.get_base_model() if is_peft(model) else model


def forward_params(model: nn.Module) -> list[str]:
    """Names of the model's forward parameters that can be passed by name, in order (for a PEFT model, those of the
    model inside it)."""
    sig = pyinspect.signature(signature_model(model).forward)
    kinds = (pyinspect.Parameter.POSITIONAL_OR_KEYWORD, pyinspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in sig.parameters.values() if p.kind in kinds]


def token_input_name(params: list[str]) -> str:
    if "input_ids" in params:
        return "input_ids"
    if not params:
        raise ValueError("the model's forward takes no named inputs (only *args / **kwargs); compile needs a "
                         "forward(input_ids, ...) — for a wrapper, compile the model it wraps")
    return params[0]


def named_inputs_module(model: nn.Module, names) -> nn.Module:
    """What torch.export captures: `model` itself, or for a PEFT model an adapter whose forward takes `names` by name
    and calls the PEFT model (export binds keyword inputs to the forward's named parameters, and PEFT's are
    `*args, **kwargs`). The adapter's parameters, buffers and submodules are the PEFT model's own dicts, so every path
    in the graph (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight`) is the PEFT model's."""
    if not is_peft(model):
        return model
    names = list(names)

    def forward(self, *args, **kwargs):
        return self._peft_model(*args, **kwargs)

    kind = pyinspect.Parameter.POSITIONAL_OR_KEYWORD
    forward.__signature__ = pyinspect.Signature(
        [pyinspect.Parameter("self", kind)] + [pyinspect.Parameter(n, kind) for n in names])
    adapter = type("PeftNamedInputs", (nn.Module,), {"forward": forward, "__module__": __name__})()
    object.__setattr__(adapter, "_peft_model", model)
    adapter._parameters, adapter._buffers, adapter._modules = model._parameters, model._buffers, model._modules
    adapter.training = model.training
    return adapter


def model_device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def vocab_size(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if getattr(config, "vocab_size", None):
        return int(config.vocab_size)
    emb = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    return emb.num_embeddings if emb is not None else None


def max_positions(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "block_size"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 1:
            return value
    embs = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    return embs[1].num_embeddings if len(embs) > 1 else None  # a learned position table (nanoGPT's wpe)


def _normalize_examples(example_inputs, params: list[str], token: str) -> dict:
    if isinstance(example_inputs, torch.Tensor):
        return {token: example_inputs}
    if isinstance(example_inputs, (tuple, list)):
        if len(example_inputs) > len(params):
            raise ValueError(f"example_inputs: got {len(example_inputs)} positional inputs but the model's forward "
                             f"takes {params}")
        return dict(zip(params, example_inputs))
    if isinstance(example_inputs, dict):
        unknown = [k for k in example_inputs if k not in params]
        if unknown:
            raise ValueError(f"example_inputs: unknown input(s) {unknown}; the model's forward takes {params}")
        return {k: v for k, v in example_inputs.items() if v is not None}
    raise TypeError(f"example_inputs must be a tensor of token ids [B, T], a tuple of positional inputs or a dict "
                    f"of named inputs, got {type(example_inputs).__name__}")


def example_inputs_for(model: nn.Module, schedule, example_inputs=None) -> tuple[dict, bool]:
    """Validated example inputs as a dict (token ids at least); True when they were generated from the config."""
    params = forward_params(model)
    token = token_input_name(params)
    device = model_device(model)
    if example_inputs is None:
        vocab = vocab_size(model)
        if vocab is None:
            raise ValueError("example_inputs: the model has no config.vocab_size and no nn.Embedding to make token "
                             "ids from; pass example_inputs=torch.randint(0, vocab, (2, T))")
        seq_len = min(DEFAULT_SEQ_LEN, (max_positions(model) or DEFAULT_SEQ_LEN + 1) - 1)
        g = torch.Generator().manual_seed(0)
        return {token: torch.randint(0, vocab, (2, seq_len), generator=g).to(device)}, True
    inputs = _normalize_examples(example_inputs, params, token)
    ids = inputs.get(token)
    if not isinstance(ids, torch.Tensor):
        raise ValueError(f"example_inputs: {token!r} (the token ids) is missing; give a [B, T] integer tensor")
    if ids.dim() != 2 or ids.is_floating_point() or ids.is_complex():
        raise ValueError(f"example_inputs: {token!r} must be an integer tensor of shape [batch, seq_len], got "
                         f"{ids.dtype} of shape {tuple(ids.shape)}")
    if ids.shape[1] < 2:
        raise ValueError(f"example_inputs: {token!r} needs at least 2 tokens so the sequence axis stays dynamic, got "
                         f"shape {tuple(ids.shape)}")
    limit = max_positions(model)
    if limit is not None and ids.shape[1] > limit:
        raise ValueError(f"example_inputs: {token!r} has {ids.shape[1]} tokens but the model has {limit} positions")
    if ids.device != device:
        raise ValueError(f"example_inputs: {token!r} is on {ids.device} but the model is on {device}")
    for name in OPTIONAL_INPUTS:
        x = inputs.get(name)
        if x is not None and (not isinstance(x, torch.Tensor) or tuple(x.shape) != tuple(ids.shape)):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"example_inputs: {name!r} must have the shape of {token!r} {tuple(ids.shape)}, got "
                             f"{shape}")
    return inputs, False


def _graph_inputs(model: nn.Module, inputs: dict) -> tuple[dict, dict]:
    """The kwargs the graph is captured with (batch >= 2 so it stays dynamic) and their dynamic shapes."""
    params = forward_params(model)
    token = token_input_name(params)
    ids = inputs[token]
    if ids.shape[0] == 1:  # batch 1 would specialize the batch axis
        inputs = {k: (v.expand(2, *v.shape[1:]).clone() if isinstance(v, torch.Tensor) else v)
                  for k, v in inputs.items()}
        ids = inputs[token]
    B, T = ids.shape
    call = {token: ids}
    if "attention_mask" in params:
        call["attention_mask"] = inputs.get("attention_mask", torch.ones_like(ids))
    if "position_ids" in params:
        call["position_ids"] = inputs.get("position_ids", torch.arange(T, device=ids.device).expand(B, T).clone())
    if "use_cache" in params:
        call["use_cache"] = False
    dims = {k: ({0: Dim.AUTO, 1: Dim.AUTO} if isinstance(v, torch.Tensor) else None) for k, v in call.items()}
    return call, dims


def run(state):
    model = state.model
    inputs, generated = example_inputs_for(model, state.schedule, state.example_inputs)
    token = token_input_name(forward_params(model))
    call, dims = _graph_inputs(model, inputs)
    flags = {m: m.training for m in model.modules()}
    traced = named_inputs_module(model, call)
    try:
        model.eval()
        ep = torch.export.export(traced.eval(), (), call, dynamic_shapes=dims, strict=False)
    except Exception as e:
        raise RuntimeError(f"capture: torch.export could not trace {type(model).__name__} "
                           f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); compile needs a model "
                           f"that torch.export.export(..., strict=False) can capture") from e
    finally:
        for m, flag in flags.items():
            m.training = flag
    gm = ep.module()
    _check_dynamic(gm, token)
    portable.prepare(gm, traced, call, model_device(model))  # dtype / device moves after compile (portable.py)
    switchable_dropout(gm, model)
    state.gm, state.token_name, state.call_inputs = gm, token, call
    state.example_shape = tuple(inputs[token].shape)
    state.generated_example = generated
    log.info("capture: exported %s with inputs %s, example shape %s, %d graph nodes", type(model).__name__,
             list(call), state.example_shape, len(gm.graph.nodes))
    return state


# ------------------------------------------------------------------------------------------------------- dropout
DROPOUT = torch.ops.aten.dropout.default
CASTS = {torch.ops.aten.to.dtype, torch.ops.aten.to.dtype_layout, torch.ops.aten._to_copy.default,
         torch.ops.aten.type_as.default, torch.ops.aten.clone.default, torch.ops.aten.contiguous.default}
SOFTMAX = {torch.ops.aten.softmax.int, torch.ops.aten._softmax.default, torch.ops.aten._safe_softmax.default}


def _on_probabilities(node: torch.fx.Node) -> bool:
    """True for dropout applied to attention probabilities (a softmax, through casts)."""
    x = node.args[0]
    while isinstance(x, torch.fx.Node) and x.op == "call_function" and x.target in CASTS:
        x = x.args[0]
    return isinstance(x, torch.fx.Node) and x.op == "call_function" and x.target in SOFTMAX


def _innermost_module(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    paths = [v[0] for v in stack.values() if isinstance(v, tuple) and isinstance(v[0], str)]
    return paths[-1] if paths else ""


def _usable(gm: torch.fx.GraphModule, name: str, p: float) -> bool:
    """`name` can hold an `nn.Dropout(p)`: nothing is there yet, or an equal dropout module is."""
    parent, _, leaf = name.rpartition(".")
    try:
        owner = gm.get_submodule(parent) if parent else gm
    except AttributeError:
        return True  # add_submodule creates the missing parents
    existing = getattr(owner, leaf, None)
    if existing is None:
        return not hasattr(owner, leaf)
    return isinstance(existing, nn.Dropout) and existing.p == p


def _dropout_name(gm: torch.fx.GraphModule, model: nn.Module, path: str, p: float) -> str:
    """Where the dropout module goes: `path` itself when the model's own `nn.Dropout(p)` lives there, else
    `<path>.dropout`, `<path>.dropout_1`, ... beside the module that called `F.dropout`."""
    try:
        own = model.get_submodule(path) if path else None
    except AttributeError:
        own = None
    if isinstance(own, nn.Dropout) and own.p == p and _usable(gm, path, p):
        return path
    base = f"{path}.dropout" if path else "dropout"
    name, i = base, 1
    while not _usable(gm, name, p):
        name, i = f"{base}_{i}", i + 1
    return name


def switchable_dropout(gm: torch.fx.GraphModule, model: nn.Module) -> list[str]:
    """Make the model's dropout follow the compiled module's `.train()` / `.eval()`.

    Captured in eval mode, each dropout the model applies is a `aten.dropout(x, p, train=False)` node that keeps the
    model's `p`. Each one becomes a call of an `nn.Dropout(p)` submodule of the graph module — at the path of the
    model's own dropout module when there is one (`transformer.h.0.mlp.dropout`), else beside the module that called
    `F.dropout` — created in eval mode; `HySparseModel.train()` reaches them like any submodule. Dropout on attention
    probabilities stays as it is (the attention is replaced; the HySparse ops have no attention dropout) and is
    named in a warning, as is dropout the eval-mode code did not record (`F.dropout(x, p if self.training else 0)`,
    HF's `attention_dropout`). Returns the paths of the dropout modules that are now applied."""
    applied: dict[str, float] = {}
    sites = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not DROPOUT or len(node.args) != 3:
            continue
        p, train = node.args[1], node.args[2]
        if train is not False or not isinstance(p, (int, float)) or p <= 0 or _on_probabilities(node):
            continue  # train=True: the code applies it in eval mode too (kept as it is)
        name = _dropout_name(gm, model, _innermost_module(node), p)
        if not isinstance(_submodule(gm, name), nn.Dropout):
            gm.add_submodule(name, nn.Dropout(float(p)).eval())
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(name, (node.args[0],))
        call.meta.update({k: node.meta[k] for k in ("nn_module_stack", "val", "stack_trace") if k in node.meta})
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        applied[name] = float(p)
        sites += 1
    if applied:
        gm.graph.lint()
        gm.recompile()
        log.info("capture: %d dropout site(s) follow .train() / .eval(): %s", sites,
                 ", ".join(f"{k} (p={v:g})" for k, v in applied.items()))
    missed = _dropout_not_applied(model, set(applied))
    if missed:
        log.warning("capture: the compiled module does not apply this dropout in .train(): %s. Dropout on attention "
                    "probabilities has no counterpart in the HySparse attention ops, and dropout that the model's "
                    "eval-mode code skips (`F.dropout(x, p if self.training else 0.0)`) is not in the captured "
                    "graph.%s", "; ".join(missed),
                    f" The model's other dropout ({sites} site(s)) is applied in .train() and off in .eval(), as in "
                    f"the original." if sites else "")
    return list(applied)


def _submodule(gm: torch.fx.GraphModule, name: str):
    try:
        return gm.get_submodule(name)
    except AttributeError:
        return None


def _dropout_not_applied(model: nn.Module, applied: set[str]) -> list[str]:
    """The model's dropout with p > 0 that the compiled module will not apply: dropout modules never called as a
    module outside attention, and config attention dropout."""
    missed = [f"{name} (p={m.p:g})" for name, m in model.named_modules()
              if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 and name not in applied]
    config = getattr(model, "config", None)
    for key in ("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob"):
        value = getattr(config, key, None)
        if isinstance(value, (int, float)) and value > 0:
            missed.append(f"config.{key}={value:g}")
    return missed


def _check_dynamic(gm: torch.fx.GraphModule, token: str) -> None:
    for node in gm.graph.nodes:
        if node.op == "placeholder" and node.name == token:
            val = node.meta.get("val")
            if val is not None and isinstance(val.shape[1], int):
                raise ValueError(f"capture: torch.export fixed the sequence length to {val.shape[1]} (the model's "
                                 f"code specializes it); one compiled module must serve every length")
            return
