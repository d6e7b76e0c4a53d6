"""The original HF model at its best, for the end-to-end bench (issue 22 item 1).

Under `torch.compile`, transformers (before torch 2.14) never drops the causal mask: `_ignore_causal_mask_sdpa`
sees `is_torchdynamo_exporting()` as true while compiling, so a [1, 1, T, T] mask is built, SDPA cannot skip the
upper triangle and K/V are repeated to all query heads. Two ways around it, both measured:

- `compile[layers]`: each decoder layer compiled on its own (`layer.compile()`); the mask is made eagerly outside
  them, where HF drops it, so every layer calls SDPA with `is_causal=True, enable_gqa=True`.
- `compile[causal]`: the whole model compiled with the attention function `causal_sdpa` registered through
  `transformers.AttentionInterface`: SDPA with `is_causal=True, enable_gqa=True` and no mask. An implementation
  HF has no mask function for gets no mask built at all. Valid for what the bench runs (a full prefill of
  unpadded rows, no cache); a mask reaching it raises (at trace time under torch.compile).

`variants(model)` returns name -> call(ids) -> logits; the bench checks each against the eager original's logits.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

CAUSAL = "hysparse_bench_causal_sdpa"


def causal_sdpa(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """HF attention-function signature: q [B, Hq, T, d], k/v [B, Hkv, T, d] -> ([B, T, Hq, d], None)."""
    if attention_mask is not None:  # raised at trace time under torch.compile: the bench's call would be wrong
        raise ValueError(f"{CAUSAL} is for unpadded full prefills without a cache; a mask reached it")
    out = F.scaled_dot_product_attention(query, key, value, is_causal=query.shape[2] > 1, scale=scaling,
                                         enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(CAUSAL, causal_sdpa)


def configs_of(model) -> list:
    """The distinct configs of `model` and its submodules (what an attention implementation is read from)."""
    return list({id(m.config): m.config for m in model.modules() if hasattr(m, "config")}.values())


@contextlib.contextmanager
def attention(configs: list, name: str):
    """Run with attention implementation `name` set on `configs` (from `configs_of`), restored after."""
    before = [c._attn_implementation for c in configs]
    for c in configs:
        c._attn_implementation = name
    try:
        yield
    finally:
        for c, b in zip(configs, before):
            c._attn_implementation = b


def decoder_layers(model):
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.ModuleList) and name.endswith("layers"):
            return list(m)
    raise ValueError("no decoder layer list (a ModuleList named *.layers) found")


def variants(model, call, backend: str = "inductor", dynamic: bool = True) -> dict:
    """name -> fn(ids) -> logits for the original: `eager` (HF's sdpa, mask dropped), `compile[layers]`,
    `compile[causal]` (module docstring). `call(m, ids)` is how the bench calls a model (SDPA backend order
    included). The per-layer compiled calls are attached for the call only, so `eager` stays eager."""
    register()
    whole = torch.compile(model, dynamic=dynamic, backend=backend)
    layers, configs = decoder_layers(model), configs_of(model)  # found once: not inside the timed calls
    impls: list = []

    def layers_compiled(ids):
        if not impls:
            impls.extend(torch.compile(layer._call_impl, dynamic=dynamic, backend=backend) for layer in layers)
        for layer, impl in zip(layers, impls):
            layer._compiled_call_impl = impl
        try:
            return call(model, ids)
        finally:
            for layer in layers:
                layer._compiled_call_impl = None

    def causal_compiled(ids):
        with attention(configs, CAUSAL):
            return call(whole, ids)

    return {"eager": lambda ids: call(model, ids), "compile[layers]": layers_compiled,
            "compile[causal]": causal_compiled}
