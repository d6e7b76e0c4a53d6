"""Pass 3 — assign roles: site i of the model takes `schedule.layers[i]` (per-layer overrides already applied there).

Checks, before anything is rewritten: the pattern length equals the number of attention sites; each sparse layer's
K/V source has the same KV heads and head dim; the chosen backend can run every layer on the model's device, dtype,
head dim and GQA group (the error names a backend that can); gates have a hidden state to read.

Warns where the schedule changes what an original sliding-window layer sees: made full, it attends to the whole
prefix; as a sparse or window-only layer with another window, its SWA branch covers another span
(`Schedule.from_model` keeps the original windows: docs/compiler.md, "Hybrid-SWA models").
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def _check_backend(state) -> None:
    from ..kernels import backends

    if state.backend not in backends.CHOICES:
        raise ValueError(f"backend must be one of {', '.join(map(repr, backends.CHOICES))}, got {state.backend!r}")
    if state.backend == "auto":
        return
    for site, spec in zip(state.sites, state.specs):
        val = site.q.meta["val"]
        op = "full_attention" if spec.role == "full" else "sparse_attention"
        try:
            backends.resolve(state.backend, op, device=val.device, dtype=val.dtype, head_dim=site.head_dim,
                             group=site.heads // site.kv_heads, block_size=spec.block_size,
                             nsel=max(spec.nsel, 1))  # selecting nothing runs as one all -1 column (rewrite.py)
        except ValueError as e:
            raise ValueError(f"assign_roles: layer {site.index} ({site.module}, Hq={site.heads}, Hkv={site.kv_heads}, "
                             f"d={site.head_dim}, {val.dtype} on {val.device.type}): {e}") from None


def run(state):
    sites, schedule = state.sites, state.schedule
    if len(schedule) != len(sites):
        listing = ", ".join(s.module or s.out.name for s in sites[:8]) + (", ..." if len(sites) > 8 else "")
        raise ValueError(f"assign_roles: the schedule's pattern {schedule.pattern!r} has {len(schedule)} layers but "
                         f"the model has {len(sites)} attention layers ({listing}); use a pattern of {len(sites)} "
                         f"letters, e.g. Schedule.hybrid({len(sites)}, ratio)")
    specs = tuple(schedule.layers)
    for site, spec in zip(sites, specs):
        if spec.role != "sparse" or spec.kv_source is None:  # full, or window-only (W): reads nothing shared
            continue
        src = sites[spec.kv_source]
        shares = spec.kv_sharing in ("sparse_branch", "both") and not spec.merge
        if (src.kv_heads, src.head_dim) != (site.kv_heads, site.head_dim) and shares:
            raise ValueError(f"assign_roles: sparse layer {site.index} ({site.kv_heads} KV heads of dim "
                             f"{site.head_dim}) cannot share K/V with full layer {src.index} ({src.kv_heads} of dim "
                             f"{src.head_dim}); use kv_sharing='none' for it in the schedule's overrides")
        if src.kv_heads != site.kv_heads:
            raise ValueError(f"assign_roles: sparse layer {site.index} has {site.kv_heads} KV heads but its index "
                             f"source, full layer {src.index}, has {src.kv_heads}; block selection is per KV group")
        if spec.gate != "none" and not spec.merge and site.gate_input is None:
            raise ValueError(f"assign_roles: sparse layer {site.index} ({site.module}) needs gate='{spec.gate}' but no "
                             f"projection feeding its queries was found to read the hidden state from; use gate='none'")
    state.specs = specs
    _check_backend(state)
    _warn_changed_windows(sites, specs)
    for site, spec in zip(sites, specs):
        if spec.role == "full":
            extra = ""
        elif spec.kv_source is None:
            extra = f" (window-only: its own window={spec.window})"
        else:
            extra = (f" <- K/V and indices of layer {spec.kv_source}, window={spec.window}, kv_sharing={spec.kv_sharing}, "
                     f"gate={spec.gate}, sinks={spec.sinks}, merge={spec.merge}, topk={spec.topk}")
        log.info("assign_roles: layer %d (%s) -> %s%s", site.index, site.module, spec.role, extra)
    return state


def _warn_changed_windows(sites, specs) -> None:
    for site, spec in zip(sites, specs):
        if site.window is None:
            continue
        where = f"layer {site.index} ({site.module}) has a sliding window of {site.window} in the original"
        if spec.role == "full":
            log.warning("assign_roles: %s; as a full layer it attends to the whole prefix, so outputs differ from the "
                        "original beyond %d tokens (Schedule.from_model(model) keeps it a sliding window)", where,
                        site.window)
        elif spec.window != site.window:
            log.info("assign_roles: %s; its SWA branch covers %s", where,
                     f"{spec.window} tokens" if spec.window is not None else "nothing (swa=False)")
