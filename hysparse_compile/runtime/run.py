"""A cached call of a compiled model: prefill an empty `HySparseCache`, or run new tokens against a filled one.

`HySparseModel` sends every call with `use_cache=True` or a `past_key_values` here. The inputs are brought to the
graph's form (the new tokens' columns of `attention_mask`, positions that continue the cached ones), the call's
`state.Step` is made active on the model's `CallState`, and the same graph as a full-sequence forward runs: its
attention nodes read and write the cache (runtime/layers.py). Nothing here syncs with the device, so a static cache's decode step can be
captured in a CUDA graph.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..graph import graph_ops
from .cache import HySparseCache, kv_dtype
from .state import Step


def _columns(name: str, x: Tensor | None, R: int, seen: int) -> Tensor | None:
    """HF passes the whole attention mask [B, seen + R] (and sometimes whole position ids): keep the new columns."""
    if x is None or x.shape[-1] == R:
        return x
    if x.shape[-1] != seen + R:
        raise ValueError(f"{name} has {x.shape[-1]} columns; expected {R} (the new tokens) or {seen + R} (the "
                         f"{seen} cached tokens plus the new ones)")
    return x[..., -R:]


def _check_cache(model, cache, ids: Tensor) -> HySparseCache:
    """The cache fits this model and call, checked before anything is written (docs/errors.md, "Caches")."""
    if not isinstance(cache, HySparseCache):
        raise TypeError(f"past_key_values must be a hysparse_compile.HySparseCache (HySparseCache(compiled, ...)) or "
                        f"None, got {type(cache).__name__}; a compiled HySparse model keeps its own cache layout")
    if cache.failed is not None:
        raise RuntimeError(f"past_key_values was left part-written by a call that failed ({cache.failed}); its "
                           f"contents no longer match its lengths. Call cache.reset() and prefill again, or make a "
                           f"new HySparseCache")
    if cache.schedule != model.schedule:
        raise ValueError(f"past_key_values was made for schedule {cache.schedule.pattern!r}, not this model's "
                         f"{model.schedule.pattern!r}")
    site = model.attention_sites[0]
    if (cache.kv_heads, cache.head_dim) != (site.kv_heads, site.head_dim):
        raise ValueError(f"past_key_values was made for a model with {cache.kv_heads} KV heads of dim "
                         f"{cache.head_dim}, not this one's {site.kv_heads} of dim {site.head_dim}; make it with "
                         f"HySparseCache(compiled) for the model it serves")
    if cache.device != ids.device:
        raise ValueError(f"past_key_values lives on {cache.device} but the input ids are on {ids.device}; make the "
                         f"cache with device={str(ids.device)!r} (or move the inputs)")
    want = kv_dtype(model, ids.device)  # None under autocast: each layer's write checks (runtime/layers.py)
    if want is not None and cache.dtype != want:
        raise ValueError(f"past_key_values stores {cache.dtype} but this call computes K/V in {want}; make the "
                         f"cache with dtype={want} (or no dtype: the model's)")
    return cache


def prepare(model, call: dict, cache: HySparseCache | None, token: str) -> tuple[dict, HySparseCache, Step]:
    """The graph's inputs for this call and its Step. call: the graph kwargs the module built (token ids, mask,
    positions as given or None)."""
    cache = HySparseCache(model) if cache is None else _check_cache(model, cache, call[token])
    ids = call[token]
    B, R = ids.shape
    seen = cache.seen
    mask = _columns("attention_mask", call.get("attention_mask"), R, seen)
    checking = not (torch.compiler.is_compiling() or torch.compiler.is_exporting()
                    or (ids.is_cuda and torch.cuda.is_current_stream_capturing()))
    if seen == 0:
        mode = "prefill"
        pads = graph_ops.left_pad_shift(mask) if mask is not None else torch.zeros(B, dtype=torch.int64,
                                                                                   device=ids.device)
        new_lengths = R - pads.to(torch.int64)
    else:
        mode = "decode" if R == 1 else "extend"
        if checking and mask is not None and not bool(mask.bool().all()):
            raise ValueError("attention_mask: new tokens after the first cached call must not be padding (left "
                             "padding belongs to the prompt); got zeros in the new tokens' columns")
        new_lengths = torch.full((B,), R, dtype=torch.int64, device=ids.device)
    cache.reserve(B, seen + R)  # real tokens per row never exceed the columns seen
    if "attention_mask" in call:
        call["attention_mask"] = mask if mask is not None else torch.ones_like(ids)
    if "position_ids" in call:
        pos = _columns("position_ids", call.get("position_ids"), R, seen)
        if pos is None:  # as the original model numbers them: columns seen so far, padding included
            pos = torch.arange(seen, seen + R, device=ids.device).expand(B, R)
        call["position_ids"] = pos
    seen_t = torch.full((), seen, dtype=torch.int64, device=ids.device)
    start = cache.lengths.clone()  # [B]
    positions = start.view(B, 1) + torch.arange(R, device=ids.device).view(1, R)  # [B, R]
    step = Step(cache=cache, mode=mode, start=start, new_lengths=new_lengths, seen=seen_t, positions=positions,
                cache_len=(start + 1).to(torch.int32))
    return call, cache, step


def finish(step: Step, R: int) -> None:
    """Count the call's tokens into the cache (after every layer has read the old lengths)."""
    cache = step.cache
    if step.mode == "prefill":
        cache.lengths.copy_(step.new_lengths)
    else:
        cache.lengths.add_(step.new_lengths)
    cache.seen += R


def keep_logits(out, logits_to_keep):
    """HF's `logits_to_keep`: an int k keeps the last k positions (0 keeps all), a tensor keeps those indices."""
    if logits_to_keep is None or (isinstance(logits_to_keep, int) and logits_to_keep == 0):
        return out
    cut = (slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep)
    if isinstance(out, Tensor):
        return out[:, cut]
    logits = getattr(out, "logits", None)
    if logits is None:
        return out
    return type(out)(**{**dict(out.items()), "logits": logits[:, cut]})


def with_cache(out, cache: HySparseCache):
    """The output with its cache field set (`cache` in transformers >= 5.2x, `past_key_values` before) for HF
    ModelOutputs; plain tensors are returned as they are."""
    if isinstance(out, Tensor) or not hasattr(out, "items"):
        return out
    fields = getattr(type(out), "__dataclass_fields__", {})
    name = "cache" if "cache" in fields else "past_key_values"
    return type(out)(**{**dict(out.items()), name: cache})
