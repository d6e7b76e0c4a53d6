"""Cached calls from several threads: each thread's `generate` sees only its own cache and step (runtime/layers.py
keeps the call in progress per thread), so its tokens equal the same call made alone."""
import queue
import threading

import torch
from transformers.generation.streamers import BaseStreamer

from test_decode import _ids, compiled

LENGTHS = (30, 47, 64, 81)  # > window (16), several blocks (16), different per thread
GREEDY = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)


def _in_threads(jobs):
    """Run each zero-argument job in its own thread, all started before any is joined; results (or the exception
    raised) in job order."""
    results = [None] * len(jobs)
    barrier = threading.Barrier(len(jobs))

    def run(i):
        barrier.wait()  # start together so the calls overlap
        try:
            results[i] = jobs[i]()
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            results[i] = error

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_generate_from_four_threads_equals_each_call_alone():
    _, c = compiled("llama-sdpa", pattern="FSSS")
    prompts = [_ids(1, n, seed=n) for n in LENGTHS]
    alone = [c.generate(p, **GREEDY) for p in prompts]
    together = _in_threads([lambda p=p: c.generate(p, **GREEDY) for p in prompts])
    for n, got, want in zip(LENGTHS, together, alone):
        assert not isinstance(got, Exception), f"prompt of {n} tokens raised {got!r}"
        assert torch.equal(got, want), f"prompt of {n} tokens: threaded tokens differ from the call alone"


def test_two_models_in_two_threads_each_generate_their_own_tokens():
    _, a = compiled("llama-sdpa", pattern="FSSS")
    _, b = compiled("qwen2-sdpa", pattern="FSFS")
    pa, pb = _ids(2, 47, seed=1), _ids(2, 64, seed=2)
    alone = [a.generate(pa, **GREEDY), b.generate(pb, **GREEDY)]
    together = _in_threads([lambda: a.generate(pa, **GREEDY), lambda: b.generate(pb, **GREEDY)] * 2)
    for got, want in zip(together, alone * 2):
        assert not isinstance(got, Exception), repr(got)
        assert torch.equal(got, want)


class _QueueStreamer(BaseStreamer):
    """HF's TextIteratorStreamer pattern without a tokenizer: token ids go through a queue to the consuming
    thread; None marks the end."""

    def __init__(self):
        self.queue = queue.Queue()

    def put(self, value):
        self.queue.put(value.clone())

    def end(self):
        self.queue.put(None)

    def __iter__(self):
        while (item := self.queue.get(timeout=120)) is not None:
            yield item


def test_streamed_generate_in_a_background_thread_while_the_main_thread_generates():
    _, c = compiled("llama-sdpa", pattern="FSSS")
    streamed_prompt, main_prompt = _ids(1, 64, seed=3), _ids(1, 30, seed=4)
    want_streamed, want_main = c.generate(streamed_prompt, **GREEDY), c.generate(main_prompt, **GREEDY)
    streamer = _QueueStreamer()
    worker = threading.Thread(target=c.generate, args=(streamed_prompt,), kwargs=dict(streamer=streamer, **GREEDY))
    worker.start()
    got_main = c.generate(main_prompt, **GREEDY)  # overlaps the background generation
    chunks = list(streamer)
    worker.join()
    assert torch.equal(got_main, want_main)
    assert torch.equal(chunks[0].view(1, -1), streamed_prompt)  # the prompt first, then one token per step
    assert torch.equal(torch.cat([t.view(1, -1) for t in chunks[1:]], 1), want_streamed[:, 64:])


def test_a_thread_without_a_cached_call_runs_the_plain_forward_while_another_decodes():
    """A full-sequence forward in one thread is unaffected by a cached call in progress in another."""
    _, c = compiled("llama-sdpa", pattern="FSSS")
    ids = _ids(2, 40, seed=5)
    want = c(ids).logits
    results = _in_threads([lambda: c(ids).logits] + [lambda: c.generate(_ids(1, 47, seed=6), **GREEDY)] * 3)
    assert not any(isinstance(r, Exception) for r in results), results
    assert torch.equal(results[0], want)
