"""`hs.generate(compiled, ids, ...)`: autoregressive generation for any compiled model — nanoGPT-style modules and
hand-written decoders included (HF models also have `compiled.generate`, transformers' own).

    >>> out = hs.generate(compiled, ids, max_new_tokens=50)                              # greedy
    >>> out = hs.generate(compiled, ids, max_new_tokens=50, temperature=0.8, top_k=40)   # sampling
"""
from __future__ import annotations

import torch
from torch import Tensor

from .cache import HySparseCache


def _logits(out) -> Tensor:
    return out if isinstance(out, Tensor) else out.logits


def sample_next(logits: Tensor, *, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> Tensor:
    """Next tokens from the last position's logits [B, V] -> int64 [B]: argmax when temperature == 0, else a sample
    of softmax(logits / temperature) restricted to the top_k tokens and the smallest set of mass >= top_p."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        mass = sorted_logits.softmax(-1).cumsum(-1)
        drop = mass - sorted_logits.softmax(-1) >= top_p  # keep the first token that crosses top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check(compiled, input_ids, max_new_tokens, temperature, top_k, top_p, attention_mask):
    if getattr(compiled, "attention_sites", None) is None:
        raise TypeError(f"generate needs a compiled HySparse model (hs.compile(model, schedule)), got "
                        f"{type(compiled).__name__}")
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be an integer tensor [batch, prompt_len], got {shape}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature must be a float >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
    if attention_mask is not None and "attention_mask" not in compiled.graph_inputs:
        raise ValueError("attention_mask: this model's forward takes no attention_mask, so its batches cannot be "
                         "padded; generate one prompt length per call")


@torch.no_grad()
def generate(compiled, input_ids: Tensor, *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, eos_token_id: int | None = None,
             attention_mask: Tensor | None = None, cache: HySparseCache | None = None,
             generator: torch.Generator | None = None, streamer=None) -> Tensor:
    """Generate `max_new_tokens` tokens after `input_ids` [B, T] with a KV cache; returns [B, T + new].

    temperature 0 (default) is greedy; > 0 samples, optionally within top_k / top_p. eos_token_id: a row that
    emitted it keeps emitting it, and generation stops once every row has. attention_mask [B, T]: left-padded
    prompts (models whose forward takes a mask). cache: a HySparseCache to fill (default: a dynamic one).
    streamer: an object with `put(tokens)` and `end()` (transformers' TextStreamer fits).
    """
    _check(compiled, input_ids, max_new_tokens, temperature, top_k, top_p, attention_mask)
    cache = HySparseCache(compiled) if cache is None else cache
    kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
    tokens, done = input_ids, torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    step_ids = input_ids
    if streamer is not None:
        streamer.put(input_ids.cpu())
    for _ in range(max_new_tokens):
        logits = _logits(compiled(step_ids, past_key_values=cache, use_cache=True, **kwargs))[:, -1]
        nxt = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        if eos_token_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
            done = done | (nxt == eos_token_id)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        if streamer is not None:
            streamer.put(nxt.cpu())
        if attention_mask is not None:
            kwargs["attention_mask"] = torch.cat([kwargs["attention_mask"], torch.ones_like(nxt[:, None])], dim=1)
        step_ids = nxt[:, None]
        if eos_token_id is not None and bool(done.all()):
            break
    if streamer is not None:
        streamer.end()
    return tokens
