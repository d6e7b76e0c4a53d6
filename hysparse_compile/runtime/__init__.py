"""The KV-cache runtime: `HySparseCache`, prefill and decode through the compiled module, `generate`.

    >>> cache = HySparseCache(compiled)                                   # dynamic; or batch_size=, max_cache_len=
    >>> logits = compiled(ids, past_key_values=cache, use_cache=True).logits    # prefill
    >>> logits = compiled(next_ids, past_key_values=cache, use_cache=True).logits   # decode, one or more tokens
    >>> hs.generate(compiled, ids, max_new_tokens=20, temperature=0.8, top_k=50)   # any compiled model
    >>> compiled.generate(ids, max_new_tokens=20)                          # HF models: transformers' generate

Design: docs/runtime.md.
"""
from .cache import HySparseCache, LayerKVSpec, layer_specs
from .state import CallState, Step

__all__ = ["HySparseCache", "LayerKVSpec", "layer_specs", "generate", "CallState", "Step"]


def __getattr__(name):
    if name == "generate":
        from .generate import generate

        return generate
    raise AttributeError(f"module 'hysparse_compile.runtime' has no attribute {name!r}")
