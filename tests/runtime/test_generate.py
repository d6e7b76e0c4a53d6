"""generate: HF models through transformers' own `compiled.generate`, any model through `hs.generate`."""
import pytest
import torch

import hysparse_compile as hs
from hysparse_compile.runtime import HySparseCache
from models import logits
from test_decode import _ids, compiled, rel


def _left_padded(lengths, seed=0):
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, T - n:], mask[i, T - n:] = _ids(1, n, seed=seed + i)[0], 1
    return ids, mask


@pytest.mark.parametrize("name", ["llama-sdpa", "qwen2-sdpa", "gpt2-sdpa"])
def test_training_free_with_every_block_generates_the_originals_tokens(name):
    """topk >= context: the compiled model is the original; greedy generation of a left-padded batch agrees."""
    model, c = compiled(name, pattern="FSS", mode="training_free", topk=128)
    ids, mask = _left_padded((30, 21, 9))
    kw = dict(attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert torch.equal(c.generate(ids, **kw), model.generate(ids, **kw))


def test_sampling_matches_the_original_under_the_same_seed():
    model, c = compiled("llama-sdpa", pattern="FSS", mode="training_free", topk=128)
    ids = _ids(2, 12, seed=4)
    kw = dict(max_new_tokens=15, do_sample=True, temperature=0.7, top_k=20, top_p=0.9, pad_token_id=0)
    torch.manual_seed(7)
    ours = c.generate(ids, **kw)
    torch.manual_seed(7)
    assert torch.equal(ours, model.generate(ids, **kw))


def test_each_padded_row_generates_what_it_generates_alone():
    _, c = compiled("llama-sdpa")  # paper mode: gates, sinks, shared K/V
    lengths = (33, 18)
    ids, mask = _left_padded(lengths, seed=20)
    kw = dict(max_new_tokens=14, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    batch = c.generate(ids, attention_mask=mask, **kw)
    for i, n in enumerate(lengths):
        alone = c.generate(ids[i:i + 1, -n:], **kw)
        assert torch.equal(batch.sequences[i, -14:], alone.sequences[0, -14:])
        for step_batch, step_alone in zip(batch.logits, alone.logits):
            assert rel(step_batch[i], step_alone[0]) < 1e-4


def test_generate_logits_equal_recomputing_the_whole_sequence():
    _, c = compiled("qwen2-sdpa")
    ids = _ids(1, 25, seed=8)
    out = c.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                     output_logits=True)
    full = logits(c(out.sequences))
    for s, step in enumerate(out.logits):
        assert rel(step[0], full[0, 24 + s]) < 1e-4


def test_generate_stops_at_eos_and_streams():
    _, c = compiled("llama-sdpa")
    ids = _ids(1, 10, seed=9)
    free = c.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    eos = int(free[0, 12])  # the third generated token

    class Streamer:
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value)

        def end(self):
            self.ended = True

    streamer = Streamer()
    out = c.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=eos, streamer=streamer)
    assert out.shape[1] <= 13 and int(out[0, -1]) == eos
    assert streamer.ended and len(streamer.chunks) == out.shape[1] - 10 + 1  # the prompt, then one per token


def test_generate_uses_a_given_static_cache():
    _, c = compiled("llama-sdpa")
    ids = _ids(2, 10, seed=11)
    cache = HySparseCache(c, batch_size=2, max_cache_len=24)
    out = c.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, cache=cache)
    assert torch.equal(out, c.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0))
    assert cache.get_seq_length() == 15 and cache.nbytes == cache.plan().total_bytes


def test_logits_to_keep_keeps_the_last_positions():
    _, c = compiled("llama-sdpa")
    ids = _ids(2, 20, seed=12)
    full = c(ids).logits
    assert torch.equal(c(ids, logits_to_keep=1).logits, full[:, -1:])
    assert torch.equal(c(ids, logits_to_keep=torch.tensor([0, 5])).logits, full[:, [0, 5]])


def test_hs_generate_greedy_on_a_plain_model_equals_recomputing_argmax():
    _, c = compiled("nano")
    ids = _ids(2, 20, seed=13)
    out = hs.generate(c, ids, max_new_tokens=15)
    for t in range(20, 35):
        assert torch.equal(out[:, t], c(out[:, :t])[:, -1].argmax(-1))


def test_hs_generate_samples_within_top_k_and_repeats_under_a_seed():
    _, c = compiled("nano")
    ids = _ids(2, 8, seed=14)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    a = hs.generate(c, ids, max_new_tokens=10, temperature=0.9, top_k=3, generator=g())
    b = hs.generate(c, ids, max_new_tokens=10, temperature=0.9, top_k=3, generator=g())
    assert torch.equal(a, b)
    for t in range(8, 18):
        top3 = c(a[:, :t])[:, -1].topk(3).indices
        assert (top3 == a[:, t:t + 1]).any(-1).all()


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    from hysparse_compile.runtime.generate import sample_next

    logits_ = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seen = {int(sample_next(logits_, temperature=1.0, top_p=0.7, generator=torch.Generator().manual_seed(s)))
            for s in range(60)}
    assert seen == {0, 1}


@pytest.mark.parametrize("kwargs,field", [(dict(max_new_tokens=0), "max_new_tokens"),
                                          (dict(max_new_tokens=3, temperature=-1.0), "temperature"),
                                          (dict(max_new_tokens=3, top_k=0), "top_k"),
                                          (dict(max_new_tokens=3, top_p=1.5), "top_p"),
                                          (dict(max_new_tokens=3, attention_mask=torch.ones(1, 5)), "attention_mask")])
def test_hs_generate_bad_arguments_name_the_field(kwargs, field):
    _, c = compiled("nano")
    with pytest.raises(ValueError, match=field):
        hs.generate(c, _ids(1, 5), **kwargs)


def test_cache_implementation_static_preallocates_a_hysparse_cache():
    _, c = compiled("llama-sdpa")
    ids = _ids(2, 10, seed=15)
    res = c.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, cache_implementation="static",
                     return_dict_in_generate=True)
    cache = res.get("cache", res.get("past_key_values"))
    assert isinstance(cache, HySparseCache) and cache.static and cache.capacity >= 15 == cache.get_seq_length()
    assert torch.equal(res.sequences, c.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0))
