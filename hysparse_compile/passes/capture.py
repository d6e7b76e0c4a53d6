"""Pass 1 — capture: `torch.export` (non-strict, training IR) with dynamic batch and sequence axes.

The graph takes the token ids plus, when the model's forward accepts them, `attention_mask`, `position_ids` and
`use_cache=False`, so one graph serves every call the compiled module accepts (defaults are filled in by the module,
see `compiler.HySparseModel`). The model is captured in eval mode (its training flags are restored afterwards).
"""
from __future__ import annotations

import inspect as pyinspect
import logging

import torch
import torch.nn as nn
from torch.export import Dim

log = logging.getLogger(__name__)

DEFAULT_SEQ_LEN = 32  # tokens in a generated example (small: the capture and the mask probe run on it)
OPTIONAL_INPUTS = ("attention_mask", "position_ids")


def forward_params(model: nn.Module) -> list[str]:
    """Names of the model's forward parameters that can be passed by name, in order."""
    sig = pyinspect.signature(model.forward)
    kinds = (pyinspect.Parameter.POSITIONAL_OR_KEYWORD, pyinspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in sig.parameters.values() if p.kind in kinds]


def token_input_name(params: list[str]) -> str:
    if "input_ids" in params:
        return "input_ids"
    if not params:
        raise ValueError("the model's forward takes no named inputs; compile needs a forward(input_ids, ...)")
    return params[0]


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
    try:
        model.eval()
        ep = torch.export.export(model, (), call, dynamic_shapes=dims, strict=False)
    except Exception as e:
        raise RuntimeError(f"capture: torch.export could not trace {type(model).__name__} "
                           f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); compile needs a model "
                           f"that torch.export.export(..., strict=False) can capture") from e
    finally:
        for m, flag in flags.items():
            m.training = flag
    gm = ep.module()
    _check_dynamic(gm, token)
    if any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules()):
        log.warning("capture: the model has dropout; the graph is captured in eval mode, so the compiled module "
                    "runs without dropout in .train() too")
    state.gm, state.token_name, state.call_inputs = gm, token, call
    state.example_shape = tuple(inputs[token].shape)
    state.generated_example = generated
    log.info("capture: exported %s with inputs %s, example shape %s, %d graph nodes", type(model).__name__,
             list(call), state.example_shape, len(gm.graph.nodes))
    return state


def _check_dynamic(gm: torch.fx.GraphModule, token: str) -> None:
    for node in gm.graph.nodes:
        if node.op == "placeholder" and node.name == token:
            val = node.meta.get("val")
            if val is not None and isinstance(val.shape[1], int):
                raise ValueError(f"capture: torch.export fixed the sequence length to {val.shape[1]} (the model's "
                                 f"code specializes it); one compiled module must serve every length")
            return
