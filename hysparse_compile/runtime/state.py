"""The call in progress of one compiled model, explicit: `CallState`, owned by the model's graph.

Each compiled model's graph module holds one `CallState` (attribute `hysparse_call`); the rewrite passes it to every
node that depends on the call in progress (`runtime.layers.full_layer` / `sparse_layer` / `positions`, the padding
rolls of `graph.graph_ops`) as the keyword `call`, through one `get_attr` node. `HySparseModel` makes a cached call
active for the duration of the graph call (`call.step(...)`), and says when a call is known to carry no padding
(`call.unpadded(...)`). There is no module-level state: two compiled models, or a model and its deep copy, never
share a `CallState`.

`CallState` is a `threading.local`: the same model used from several threads (a thread pool of `generate` calls, a
streamer's background thread) gives each thread its own call (docs/runtime.md, "Threads"). A thread-local, not a
`ContextVar`: Dynamo traces attribute reads of a thread-local object without a graph break (`ContextVar.get` breaks
the graph in torch 2.13), so `torch.compile(compiled)` stays one graph.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

from torch import Tensor


@dataclass
class Step:
    """One cached call in progress: the cache, the kind of call, and per-row positions.

    `cache` is a `HySparseCache`, or anything with its storage protocol (`runtime/cache.py`, `KVStore`: `specs`,
    `keys`, `values`, `full_kv(layer)`, `failed`), as the exporters' tensors-in/tensors-out cache."""

    cache: object
    mode: str  # "prefill" | "decode" | "extend"
    start: Tensor  # int64 [B]: tokens cached per row before this call (the first new token's position)
    new_lengths: Tensor  # int64 [B]: real (non-pad) new tokens per row
    seen: Tensor  # int64 0-d: columns seen before this call (padding included), for models that number positions
    positions: Tensor  # int64 [B, R]: start[b] + r, the cache slot of each new token (decode / extend)
    cache_len: Tensor  # int32 [B]: start + 1, what the decode ops take (made once per call, not once per layer)


class CallState(threading.local):
    """The cached call in progress and whether the call is known unpadded, per thread, for one compiled model."""

    def __init__(self):  # run once per thread that touches the object (threading.local's contract)
        self.active: Step | None = None
        self.known_unpadded = False

    @contextlib.contextmanager
    def step(self, s: Step):
        """Make `s` the cached call the graph's attention nodes serve, in this thread, while the block runs. If the
        block raises, the cache may hold part of the call's K/V: it is marked failed (`HySparseCache.failed`) and
        refuses further calls until `reset()`."""
        previous, self.active = self.active, s
        try:
            yield s
        except BaseException as error:
            s.cache.failed = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:200]
            raise
        finally:
            self.active = previous

    @contextlib.contextmanager
    def unpadded(self, known: bool = True):
        """Inside the block the model's call is known to carry no padding (no attention_mask was given, or it is all
        ones): the graph's padding rolls are skipped, two gathers per tensor and layer."""
        previous, self.known_unpadded = self.known_unpadded, bool(known)
        try:
            yield
        finally:
            self.known_unpadded = previous

    def padding_free(self) -> bool:
        """No row of the call in progress can be padded: it is known unpadded, or it is a cached decode / extend call
        (new tokens after the first cached call are never padding; runtime/run.py checks it)."""
        s = self.active
        return self.known_unpadded or (s is not None and s.mode != "prefill")

    def __deepcopy__(self, memo):
        return type(self)()  # a copied model has its own calls

    def __reduce__(self):
        return type(self), ()


GRAPH_ATTRIBUTE = "hysparse_call"  # the attribute of a compiled graph module that holds its CallState


def of(graph_module) -> CallState:
    """The CallState a compiled graph module holds (set by the rewrite pass)."""
    return getattr(graph_module, GRAPH_ATTRIBUTE)
