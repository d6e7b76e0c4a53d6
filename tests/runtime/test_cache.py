"""HySparseCache: what each layer keeps, bytes equal to plan_kv, static and dynamic allocation, bad input."""
import pytest
import torch

import hysparse_compile as hs
from hysparse_compile.runtime import HySparseCache
from test_decode import _ids, compiled


@pytest.mark.parametrize("options", [dict(), dict(mode="training_free"), dict(kv_sharing="none"),
                                     dict(kv_sharing="both"), dict(swa=False)],
                         ids=["paper", "training_free", "kv_sharing_none", "kv_sharing_both", "no_swa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_static_cache_bytes_equal_plan_kv(options, dtype):
    _, c = compiled("llama-sdpa", **options)
    site = c._hysparse_state.sites[0]
    for batch, length in ((3, 200), (1, 7)):  # 7 < window: the rings hold only 7 slots, as planned
        cache = HySparseCache(c, batch_size=batch, max_cache_len=length, dtype=dtype)
        plan = hs.plan_kv(c.schedule, num_kv_heads=site.kv_heads, head_dim=site.head_dim, batch=batch,
                          seq_len=length, dtype=dtype)
        assert cache.nbytes == plan.total_bytes == cache.plan().total_bytes


def test_paper_cache_keeps_full_layers_whole_and_sparse_layers_a_ring():
    _, c = compiled("llama-sdpa")
    cache = HySparseCache(c, batch_size=2, max_cache_len=100)
    assert [s.store for s in cache.specs] == ["full", "ring", "full", "ring"]
    assert cache.keys[0].shape == (2, 2, 100, 16) and cache.keys[1].shape == (2, 2, 16, 16)


def test_dynamic_cache_grows_in_chunks_and_matches_the_plan_at_its_capacity():
    _, c = compiled("llama-sdpa")
    cache = HySparseCache(c, grow=32)
    assert cache.nbytes == 0
    c(_ids(2, 20), past_key_values=cache, use_cache=True)
    assert cache.capacity == 32 and cache.nbytes == cache.plan().total_bytes
    c(_ids(2, 30), past_key_values=cache, use_cache=True)
    assert cache.capacity == 64 and cache.nbytes == cache.plan().total_bytes and cache.get_seq_length() == 50


def test_ring_keeps_the_last_window_tokens_of_the_layer_across_growth():
    """The ring holds the sparse layer's own K of the last `window` positions at slot p % W, also after the cache
    grew (the ring is re-laid): compare with a cache that was large from the start."""
    _, c = compiled("llama-sdpa")
    ids = _ids(1, 27, seed=5)
    small, big = HySparseCache(c, grow=4), HySparseCache(c, batch_size=1, max_cache_len=64)
    for cache in (small, big):
        c(ids[:, :3], past_key_values=cache, use_cache=True)
        for t in range(3, 27, 2):  # two tokens a call: the ring wraps (window 16) and grows (4 -> 28 slots)
            c(ids[:, t:t + 2], past_key_values=cache, use_cache=True)
    assert small.capacity == 28 and small.keys[1].shape == big.keys[1].shape  # ring: min(window, capacity) slots
    torch.testing.assert_close(small.keys[1], big.keys[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(small.keys[0][:, :, :27], big.keys[0][:, :, :27], rtol=1e-5, atol=1e-6)


def test_static_cache_refuses_to_overflow_and_names_the_size():
    _, c = compiled("llama-sdpa")
    cache = HySparseCache(c, batch_size=1, max_cache_len=16)
    c(_ids(1, 10), past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match="max_cache_len=16"):
        c(_ids(1, 7), past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match="batch_size=1"):
        c(_ids(2, 1), past_key_values=cache, use_cache=True)


@pytest.mark.parametrize("kwargs,field", [(dict(batch_size=0, max_cache_len=10), "batch_size"),
                                          (dict(batch_size=1, max_cache_len=-3), "max_cache_len"),
                                          (dict(grow=0), "grow")])
def test_bad_cache_arguments_name_the_field(kwargs, field):
    _, c = compiled("llama-sdpa")
    with pytest.raises(ValueError, match=field):
        HySparseCache(c, **kwargs)


def test_cache_needs_a_compiled_model():
    with pytest.raises(TypeError, match="compiled HySparse model"):
        HySparseCache(torch.nn.Linear(2, 2))


def test_reset_forgets_the_tokens_and_reuses_the_allocation():
    _, c = compiled("llama-sdpa")
    ids = _ids(1, 20, seed=3)
    cache = HySparseCache(c, batch_size=1, max_cache_len=32)
    first = c(ids, past_key_values=cache, use_cache=True).logits
    cache.reset()
    assert cache.get_seq_length() == 0
    assert torch.allclose(c(ids, past_key_values=cache, use_cache=True).logits, first)
