"""Pass 5 — plan memory: attach the KV plan (`hysparse_compile.kv_plan.plan_kv`) for the model's real KV heads and
head dim, the cache dtype of its K tensors, and the example's batch and length — or, when the example was generated,
batch 1 at the model's maximum positions.
"""
from __future__ import annotations

import logging

from . import capture

log = logging.getLogger(__name__)


def run(state):
    from ..kv_plan import plan_kv  # lazy: the planner is a separate module

    site = state.sites[0]
    val = site.k.meta["val"]
    batch, seq_len = state.example_shape
    if state.generated_example:
        batch, seq_len = 1, capture.max_positions(state.model) or seq_len
    state.kv_plan = plan_kv(state.schedule, num_kv_heads=site.kv_heads, head_dim=site.head_dim, batch=batch,
                            seq_len=seq_len, dtype=val.dtype, num_layers=len(state.sites))
    log.info("plan_memory: KV plan for batch %d x %d tokens, %s: %d bytes", batch, seq_len, val.dtype,
             state.kv_plan.total_bytes)
    return state
