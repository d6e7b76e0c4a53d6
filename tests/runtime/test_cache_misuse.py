"""Cache misuse and generate arguments (docs/errors.md, "Caches" and "generate"): each refused call names what was
wrong and what is valid, and leaves the cache as it was; a cache that a failed call left part-written refuses
further calls until reset."""
import pytest
import torch

import hysparse_compile as hs
from hysparse_compile import functional
from hysparse_compile.runtime import HySparseCache
from models import build
from test_decode import _ids, compiled, rel


def _snapshot(cache):
    tensors = [t.clone() for t in cache.keys + cache.values if t is not None]
    lengths = None if cache.lengths is None else cache.lengths.clone()
    return tensors, lengths, cache.seen


def _unchanged(cache, snap):
    tensors, lengths, seen = snap
    now = [t for t in cache.keys + cache.values if t is not None]
    assert len(now) == len(tensors) and all(torch.equal(a, b) for a, b in zip(now, tensors))
    assert (lengths is None and cache.lengths is None) or torch.equal(cache.lengths, lengths)
    assert cache.seen == seen


def _prefilled(c, B=2, T=20, **kwargs):
    cache = HySparseCache(c, **kwargs)
    c(_ids(B, T), past_key_values=cache, use_cache=True)
    return cache


@pytest.mark.parametrize("make, call, words", [
    (lambda c: _prefilled(c), lambda c, cache: c(_ids(3, 1), past_key_values=cache, use_cache=True),
     ["holds 2 sequences", "batch of 3"]),
    (lambda c: _prefilled(c, batch_size=2, max_cache_len=24),
     lambda c, cache: c(_ids(2, 5), past_key_values=cache, use_cache=True), ["max_cache_len=24", "needs 25"]),
    (lambda c: _prefilled(c, batch_size=2, max_cache_len=24),
     lambda c, cache: c(_ids(1, 1), past_key_values=cache, use_cache=True), ["batch_size=2", "batch of 1"]),
], ids=["dynamic_wrong_batch", "static_overflow", "static_wrong_batch"])
def test_refused_calls_name_the_size_and_leave_the_cache_as_it_was(make, call, words):
    _, c = compiled("llama-sdpa")
    cache = make(c)
    snap = _snapshot(cache)
    with pytest.raises(ValueError) as info:
        call(c, cache)
    assert all(w in str(info.value) for w in words), str(info.value)
    _unchanged(cache, snap)


def test_a_cache_of_another_dtype_is_refused_before_anything_is_written():
    _, c = compiled("llama-sdpa")
    cache = _prefilled(c, dtype=torch.float32)
    cache.dtype = torch.bfloat16  # as if made with dtype=torch.bfloat16 for this float32 model
    snap = _snapshot(cache)
    with pytest.raises(ValueError, match=r"stores torch.bfloat16 but this call computes K/V in torch.float32"):
        c(_ids(2, 1), past_key_values=cache, use_cache=True)
    _unchanged(cache, snap)
    with pytest.raises(ValueError, match="dtype=torch.float32"):
        c(_ids(2, 5), past_key_values=HySparseCache(c, dtype=torch.bfloat16), use_cache=True)


def test_under_autocast_a_cache_of_another_dtype_is_refused_at_the_first_layer():
    """Under autocast the graph decides the K/V dtype: the first write checks it, names the layer, and the cache is
    marked failed (nothing of that layer was written)."""
    _, c = compiled("llama-sdpa")
    cache = HySparseCache(c, dtype=torch.float16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(TypeError, match=r"stores torch.float16 but layer 0 computes its K/V in torch\.\w+; make "
                                            r"the cache with HySparseCache\(compiled, dtype="):
            c(_ids(2, 20), past_key_values=cache, use_cache=True)
    assert cache.failed is not None and all(not t.any() for t in cache.keys if t is not None)


def test_a_cache_on_another_device_is_refused():
    _, c = compiled("llama-sdpa")
    with pytest.raises(ValueError, match="lives on meta but the input ids are on cpu; make the cache with device="):
        c(_ids(2, 5), past_key_values=HySparseCache(c, device="meta"), use_cache=True)


def test_a_cache_of_another_model_is_refused():
    _, c = compiled("llama-sdpa")
    other = hs.compile(build("llama-sdpa", layers=2), hs.Schedule.from_pattern("FF", block_size=16, topk=32))
    with pytest.raises(ValueError, match="made for schedule 'FF', not this model's 'FSFS'"):
        c(_ids(2, 5), past_key_values=HySparseCache(other), use_cache=True)
    import models

    wide = hs.compile(models.hf_model("llama", layers=4, heads=4, kv_heads=4), c.schedule)
    with pytest.raises(ValueError, match="4 KV heads of dim 16, not this one's 2 of dim 16"):
        c(_ids(2, 5), past_key_values=HySparseCache(wide), use_cache=True)
    with pytest.raises(TypeError, match="must be a hysparse_compile.HySparseCache"):
        c(_ids(2, 5), past_key_values=[], use_cache=True)


def test_a_cache_left_part_written_by_a_failed_call_refuses_until_reset(monkeypatch):
    _, c = compiled("llama-sdpa")
    cache = _prefilled(c)
    ids = _ids(2, 8, seed=2)
    want = c(torch.cat([_ids(2, 20), ids], 1)).logits[:, 20:]

    def broken(*args, **kwargs):
        raise RuntimeError("kernel failed")

    with monkeypatch.context() as m:  # the full layer 0 writes its K/V, then the sparse layer 1 fails
        m.setattr(functional, "sparse_attention", broken)
        m.setattr(hs.runtime.layers.extend, "sparse_attention_extend", broken)
        with pytest.raises(RuntimeError, match="kernel failed"):
            c(ids, past_key_values=cache, use_cache=True)
    assert cache.failed and "kernel failed" in cache.failed
    with pytest.raises(RuntimeError, match=r"left part-written by a call that failed \(RuntimeError: kernel failed"):
        c(ids, past_key_values=cache, use_cache=True)
    cache.reset()
    got = torch.cat([c(_ids(2, 20), past_key_values=cache, use_cache=True).logits,
                     c(ids, past_key_values=cache, use_cache=True).logits], 1)[:, 20:]
    assert rel(got, want) < 1e-4


# ------------------------------------------------------------------------------------------------ generate arguments
def test_beam_search_equals_the_originals_when_every_block_is_selected():
    """num_beams > 1 is supported: HySparseCache reorders its rows (rings and lengths too) between steps."""
    model, c = compiled("llama-sdpa", pattern="FSS", mode="training_free", topk=128)
    ids = _ids(2, 24, seed=3)
    kw = dict(max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0, early_stopping=True)
    assert torch.equal(c.generate(ids, **kw), model.generate(ids, **kw))


@pytest.mark.parametrize("kwargs", [dict(prompt_lookup_num_tokens=3), "assistant"], ids=["prompt_lookup", "assisted"])
def test_assisted_decoding_is_refused_and_says_why(kwargs):
    _, c = compiled("llama-sdpa")
    kwargs = dict(assistant_model=c) if kwargs == "assistant" else kwargs
    with pytest.raises(ValueError, match="assisted decoding.*not supported.*SWA rings cannot be rolled back"):
        c.generate(_ids(1, 10), max_new_tokens=4, do_sample=False, pad_token_id=0, **kwargs)


def test_a_mask_with_holes_is_refused_in_generate():
    _, c = compiled("llama-sdpa")
    ids = _ids(2, 12)
    mask = torch.ones_like(ids)
    mask[1, 4] = 0
    with pytest.raises(ValueError, match="attention_mask row 1 has holes"):
        c.generate(ids, attention_mask=mask, max_new_tokens=2, pad_token_id=0)


@pytest.mark.parametrize("kwargs, words", [
    (dict(cache_implementation="offloaded"), "cache_implementation='offloaded' is not available for a HySparse model"),
    ("both", "pass either a cache or cache_implementation, not both"),
])
def test_cache_arguments_of_generate_name_what_is_valid(kwargs, words):
    _, c = compiled("llama-sdpa")
    if kwargs == "both":
        kwargs = dict(cache_implementation="static", past_key_values=HySparseCache(c))
    with pytest.raises(ValueError, match=words):
        c.generate(_ids(1, 10), max_new_tokens=2, do_sample=False, pad_token_id=0, **kwargs)


def test_an_input_the_capture_did_not_take_is_refused_naming_what_is_accepted():
    _, c = compiled("llama-sdpa")
    with pytest.raises(TypeError, match=r"input\(s\) \['inputs_embeds'\] are not supported by the compiled module; "
                                        r"it accepts \['input_ids'"):
        c(_ids(1, 10), inputs_embeds=torch.zeros(1, 10, 64))
