"""Cached decoding (prefill, then one or more new tokens per call) equals re-running the compiled model on the whole
sequence, for every family and mode, at lengths that cross block (16) and window (16) boundaries."""
import functools

import pytest
import torch

import hysparse_compile as hs
from hysparse_compile.runtime import HySparseCache
from models import build, logits

VOCAB = 128
# prefill 23 tokens, then single tokens, an extend chunk of 5, one of 17 (> window: the ring wraps inside a call)
CHUNKS = (23, 1, 1, 5, 1, 17, 1, 1, 2, 1)


@functools.lru_cache(maxsize=None)
def compiled(name: str, pattern: str = "FSFS", mode: str = "paper", topk: int = 32, **options):
    model = build(name, layers=len(pattern))
    schedule = hs.Schedule.from_pattern(pattern, block_size=16, topk=topk, window=16, mode=mode, **options)
    init = {} if mode == "training_free" else dict(gate_init=lambda w: torch.nn.init.normal_(w, std=0.2),
                                                   sink_init=0.5)
    return model, hs.compile(model, schedule, **init)


def _ids(B, T, seed=0):
    return torch.randint(1, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))  # 0 is the pad id


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def cached_logits(c, ids, chunks=CHUNKS, cache=None, **kwargs):
    cache = HySparseCache(c) if cache is None else cache
    out, t = [], 0
    for n in chunks:
        out.append(logits(c(ids[:, t:t + n], past_key_values=cache, use_cache=True, **kwargs)))
        t += n
    return torch.cat(out, 1), cache


@pytest.mark.parametrize("name", ["llama-sdpa", "qwen2-sdpa", "gpt2-sdpa", "nano"])
@pytest.mark.parametrize("mode", ["paper", "training_free"])
def test_cached_decoding_equals_full_forward(name, mode):
    _, c = compiled(name, mode=mode)
    ids = _ids(2, sum(CHUNKS))
    got, cache = cached_logits(c, ids)
    assert rel(got, logits(c(ids))) < 1e-4
    assert cache.get_seq_length() == sum(CHUNKS) and cache.lengths.tolist() == [sum(CHUNKS)] * 2


@pytest.mark.parametrize("options", [dict(kv_sharing="none"), dict(kv_sharing="both"), dict(swa=False)],
                         ids=["kv_sharing_none", "kv_sharing_both", "no_swa"])
def test_cached_decoding_equals_full_forward_in_the_ablations(options):
    _, c = compiled("llama-sdpa", **options)
    ids = _ids(3, sum(CHUNKS), seed=1)
    assert rel(cached_logits(c, ids)[0], logits(c(ids))) < 1e-4


def test_static_cache_decodes_like_the_dynamic_one():
    _, c = compiled("llama-sdpa")
    ids = _ids(2, sum(CHUNKS), seed=2)
    static = HySparseCache(c, batch_size=2, max_cache_len=64)
    got, _ = cached_logits(c, ids, cache=static)
    ref, _ = cached_logits(c, ids)
    assert rel(got, ref) < 1e-6 and static.capacity == 64


def test_left_padded_rows_decode_like_the_unpadded_rows_alone():
    _, c = compiled("llama-sdpa")
    lengths, steps = (30, 19), 12
    rows = [_ids(1, n + steps, seed=10 + i) for i, n in enumerate(lengths)]
    T = max(lengths)
    ids = torch.zeros(2, T, dtype=torch.long)
    mask = torch.zeros(2, T, dtype=torch.long)
    for i, (row, n) in enumerate(zip(rows, lengths)):
        ids[i, T - n:], mask[i, T - n:] = row[0, :n], 1
    cache = HySparseCache(c)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    batch = [logits(c(ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True))]
    for s in range(steps):
        nxt = torch.stack([row[0, n + s] for row, n in zip(rows, lengths)])[:, None]
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
        batch.append(logits(c(nxt, attention_mask=mask, position_ids=pos[:, -1:] + s + 1, past_key_values=cache,
                              use_cache=True)))
    batch = torch.cat(batch, 1)
    for i, (row, n) in enumerate(zip(rows, lengths)):
        alone = logits(c(row))  # the row alone, unpadded, whole sequence
        assert rel(batch[i, T - n:], alone[0]) < 1e-4


def test_new_tokens_may_not_be_padding_once_the_cache_holds_tokens():
    _, c = compiled("llama-sdpa")
    cache = HySparseCache(c)
    c(_ids(1, 10), past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match="must not be padding"):
        c(_ids(1, 2), attention_mask=torch.tensor([[1] * 10 + [1, 0]]), past_key_values=cache, use_cache=True)


def test_a_cache_of_another_schedule_is_refused():
    _, c = compiled("llama-sdpa")
    _, other = compiled("llama-sdpa", pattern="FFSS")
    with pytest.raises(ValueError, match="schedule"):
        c(_ids(1, 10), past_key_values=HySparseCache(other), use_cache=True)


def test_plain_model_needs_a_cache_to_fill():
    _, c = compiled("nano")
    with pytest.raises(TypeError, match="HySparseCache"):
        c(_ids(1, 10), use_cache=True)


def test_graph_runner_takes_a_torch_compiled_graph_module():
    """`graph_runner(torch.compile(graph_module))` (how bench_decode times the graph under Inductor) runs the
    cached decode with the compiled runner: a torch.compile'd module cannot be truth-tested (its `len()` raises),
    which the runner lookup once did."""
    _, model = compiled("nano", "FS")
    tokens = _ids(1, 21)
    calls = []

    def backend(gm, example_inputs):
        calls.append(1)
        return gm.forward

    torch._dynamo.reset()
    try:
        with torch.no_grad():
            want, _ = cached_logits(model, tokens, (20, 1))
            with model.graph_runner(torch.compile(model.graph_module, backend=backend, dynamic=False)):
                got, _ = cached_logits(model, tokens, (20, 1))
    finally:
        torch._dynamo.reset()
    assert calls, "the compiled runner was not used"
    assert torch.equal(got, want)
