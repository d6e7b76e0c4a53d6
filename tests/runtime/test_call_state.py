"""The call in progress is explicit state of each compiled model (runtime/state.py): a `CallState` its graph holds
and passes to the nodes that read it; no module-level state. torch.compile of a compiled model stays one graph."""
import copy

import torch
import torch._dynamo as dynamo
from torch._dynamo.utils import counters

import hysparse_compile as hs
from hysparse_compile.runtime import layers
from hysparse_compile.runtime.state import CallState
from models import compiled_pair, logits


def _ids(B, T, seed=0):
    return torch.randint(1, 128, (B, T), generator=torch.Generator().manual_seed(seed))


def test_each_compiled_model_and_each_copy_has_its_own_call_state():
    _, a = compiled_pair("llama-sdpa", mode="paper", pattern="FSS")
    _, b = compiled_pair("qwen2-sdpa")
    twin = copy.deepcopy(a)
    states = [m.call_state for m in (a, b, twin)]
    assert all(isinstance(s, CallState) for s in states) and len({id(s) for s in states}) == 3
    assert not any(isinstance(v, CallState) for v in vars(layers).values())  # nothing at module level
    gm = a.graph_module
    (node,) = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == "hysparse_call"]
    readers = {u.target for u in node.users}
    assert layers.full_layer in readers and layers.sparse_layer in readers


def test_torch_compile_of_a_compiled_model_is_one_graph_and_serves_cached_calls():
    _, c = compiled_pair("llama-sdpa", mode="paper", pattern="FSSS")
    ids = _ids(2, 40)
    cc = torch.compile(c, backend="eager")
    with torch.no_grad():
        want = logits(c(ids))
        dynamo.reset()
        counters.clear()
        got = logits(cc(ids))
        assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"], dict(counters["graph_break"])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        eager_cache = hs.HySparseCache(c, batch_size=2, max_cache_len=64)
        compiled_cache = hs.HySparseCache(c, batch_size=2, max_cache_len=64)
        steps = (ids[:, :30], ids[:, 30:31], ids[:, 31:35])  # prefill, decode, extend
        for part in steps:
            e = logits(c(part, past_key_values=eager_cache, use_cache=True))
            g = logits(cc(part, past_key_values=compiled_cache, use_cache=True))
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
        assert not counters["graph_break"], dict(counters["graph_break"])


def test_the_ops_ask_nothing_an_older_dynamo_cannot_trace(monkeypatch):
    """torch 2.11's Dynamo (the GPU machine's) cannot trace `torch.amp.is_autocast_available` (a C builtin) and broke
    the graph at every HySparse op; the ops' wrappers no longer ask it while Dynamo traces. Stood in for here by a
    function that breaks the graph: the compiled model must stay one graph."""
    def breaks(*args, **kwargs):
        dynamo.graph_break()
        return True

    monkeypatch.setattr(torch.amp, "is_autocast_available", breaks)
    _, c = compiled_pair("llama-sdpa", mode="paper", pattern="FSSS")
    ids = _ids(1, 40)
    dynamo.reset()
    counters.clear()
    with torch.no_grad():
        torch.compile(c, backend="eager")(ids)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"], dict(counters["graph_break"])
    dynamo.reset()
