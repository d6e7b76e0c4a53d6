"""`to_onnx(..., decode=True)`: a prefill graph that also returns the HySparse cache, and a decode-step graph that
takes it and returns it one token longer, so a runtime without PyTorch can generate (docs/export.md, "Decode").

Both graphs are the compiled model's one graph run through the KV-cache runtime (`runtime/layers.py`, a
`state.Step` active on the model's call state while it is captured), with the cache as graph inputs and outputs: a
`HySparseCache` wraps them (`HySparseCache.from_tensors`), so the graph nodes serve the export as they serve
`generate`:

    prefill: input_ids [B, T], attention_mask [B, T], position_ids [B, T] (if the model takes them)
          -> logits [B, T, V], present.lengths int64 [B], present.<i>.key, present.<i>.value, ...
    decode:  input_ids [B, 1], past.lengths [B], past.<i>.key, past.<i>.value, ...
          -> logits [B, 1, V], present.lengths, present.<i>.key, present.<i>.value, ...

`<i>` runs over the layers that store something, in layer order (`kv_plan.storage`): a full layer (and a
sparse layer in training-free or `kv_sharing="none"` mode) stores its K/V for the whole context, `[B, Hkv, S, d]`,
row b's real tokens at slots `0 .. lengths[b]-1` (left padding is rolled away); a paper-mode sparse layer stores a
ring of its last `window` K/V, `[B, Hkv, window, d]`, position p in slot p % window. The prefill returns S = T; each
decode step returns S + 1 (the new token goes to slot `lengths[b]`, so rows of different lengths share one tensor).
The decode step numbers the new token's position `lengths[b]` (the real tokens before it), as transformers'
`generate` does for left-padded prompts; pass the prompt's `position_ids` the same way (`cumsum(mask) - 1`).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.export import Dim

from ..graph import graph_ops
from ..runtime.cache import HySparseCache, layer_specs
from ..runtime.state import Step
from . import program
from .program import Program, Stage


def stored_layers(compiled) -> list:
    """The layer specs that keep a cache ('full' or 'ring' store), in layer order."""
    return [s for s in layer_specs(compiled.schedule) if s.store in ("full", "ring")]


def cache_names(compiled, prefix: str) -> tuple[str, ...]:
    names = [f"{prefix}.lengths"]
    for spec in stored_layers(compiled):
        names += [f"{prefix}.{spec.index}.key", f"{prefix}.{spec.index}.value"]
    return tuple(names)


def _logits(out) -> Tensor:
    return out if isinstance(out, Tensor) else out.logits


def _flat(cache: HySparseCache, lengths: Tensor) -> tuple:
    out = [lengths]
    for spec in cache.specs:
        if spec.store in ("full", "ring"):
            out += [cache.keys[spec.index], cache.values[spec.index]]
    return tuple(out)


class PrefillWithCache(nn.Module):
    """The compiled model's prefill, returning its logits and the filled cache (module docstring)."""

    def __init__(self, compiled, names: tuple[str, ...]):
        super().__init__()
        self.model, self.names = compiled, names
        site = compiled.attention_sites[0]
        self.kv_heads, self.head_dim = site.kv_heads, site.head_dim
        self.specs = layer_specs(compiled.schedule)

    def forward(self, *tensors):
        inputs = dict(zip(self.names, tensors))
        ids = inputs[self.model.token_name]
        B, T = ids.shape
        dtype = next(iter(self.model.parameters())).dtype
        new = lambda n: ids.new_zeros((B, self.kv_heads, n, self.head_dim), dtype=dtype)  # noqa: E731
        keys, values = {}, {}
        for spec in self.specs:
            if spec.store != "none":
                keys[spec.index], values[spec.index] = (new(T), new(T)) if spec.store == "full" else \
                    (new(spec.window), new(spec.window))
        mask = inputs.get("attention_mask")
        pads = graph_ops.left_pad_shift(mask) if mask is not None else ids.new_zeros(B)
        lengths = T - pads.to(torch.int64)
        cache = HySparseCache.from_tensors(self.model, keys, values, lengths)
        zeros = ids.new_zeros(B, dtype=torch.int64)
        positions = torch.arange(T, device=ids.device).expand(B, T)
        step = Step(cache=cache, mode="prefill", start=zeros, new_lengths=lengths, seen=zeros.sum(),
                    positions=positions, cache_len=(zeros + 1).to(torch.int32))
        call = self.model.graph_kwargs(ids, mask, inputs.get("position_ids", positions))
        with self.model.call_state.step(step):
            out = self.model.graph_module(**call)
        return (_logits(out), *_flat(cache, lengths))


class DecodeStep(nn.Module):
    """One decode step over the cache tensors (module docstring)."""

    def __init__(self, compiled):
        super().__init__()
        self.model = compiled
        self.specs = layer_specs(compiled.schedule)
        self.stored = stored_layers(compiled)

    def forward(self, input_ids: Tensor, lengths: Tensor, *past):
        B = input_ids.shape[0]
        keys, values = {}, {}
        for spec, k, v in zip(self.stored, past[0::2], past[1::2]):
            if spec.store == "full":  # one more slot: the new token goes to slot lengths[b] <= S
                k, v = F.pad(k, (0, 0, 0, 1)), F.pad(v, (0, 0, 0, 1))
            else:
                k, v = k.clone(), v.clone()
            keys[spec.index], values[spec.index] = k, v
        cache = HySparseCache.from_tensors(self.model, keys, values, lengths)
        positions = lengths.reshape(B, 1)
        step = Step(cache=cache, mode="decode", start=lengths, new_lengths=torch.ones_like(lengths),
                    seen=lengths.max(), positions=positions, cache_len=(lengths + 1).to(torch.int32))
        call = self.model.graph_kwargs(input_ids, None, positions)
        with self.model.call_state.step(step):
            out = self.model.graph_module(**call)
        return (_logits(out), *_flat(cache, lengths + 1))


def _decode_dims(stored, past_len: Dim) -> tuple:
    """Dynamic axes in DecodeStep.forward's structure: (input_ids, lengths, (past tensors...))."""
    past = []
    for spec in stored:
        dim = {0: program.BATCH, 2: past_len} if spec.store == "full" else {0: program.BATCH}
        past += [dim, dim]
    return {0: program.BATCH}, {0: program.BATCH}, tuple(past)


def _prefill_dims(names: tuple[str, ...]) -> tuple:
    """Dynamic axes in PrefillWithCache.forward's structure: ((each input [batch, seq]),)."""
    return (tuple({0: program.BATCH, 1: program.SEQ} for _ in names),)


def capture(compiled, example_inputs, table: dict, stage: Stage | None = None) -> tuple[Program, Program]:
    """The prefill-with-cache and decode-step programs; the decode example is the greedy next token after the
    prefill example, with the prefill's cache."""
    program.check_compiled(compiled)
    inputs = program.normalize_inputs(compiled, example_inputs, positions=True)
    prefill = PrefillWithCache(compiled, tuple(inputs))
    decode = DecodeStep(compiled)
    with program.eval_mode(compiled):
        ref = program.run_example(prefill, inputs)
        next_ids = ref[0][:, -1].argmax(-1, keepdim=True)  # [B, 1]
        step_inputs = dict(zip(("input_ids",) + cache_names(compiled, "past"), (next_ids, *ref[1:])))
        step_ref = program.as_tuple(decode(*step_inputs.values()))
        if stage:
            stage("capture prefill and decode step (torch.export, dynamic batch and lengths)")
        names = ("logits",) + cache_names(compiled, "present")
        prefill_prog = program.capture_module(prefill, inputs, _prefill_dims(tuple(inputs)), table, ref, names)
        decode_prog = program.capture_module(decode, step_inputs, _decode_dims(decode.stored, Dim("past", min=1)),
                                             table, step_ref, names)
    return prefill_prog, decode_prog
