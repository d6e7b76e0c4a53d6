"""What each attention layer of a served HySparse checkpoint does, and what KV cache vLLM gives it.

Read from the checkpoint `compiled.save_pretrained` wrote (`schedule.json`, `hysparse.json`); no vLLM import.
The cache rules are `kv_plan`'s (hysparse_compile/kv_plan.py), mapped onto vLLM's KV cache specs:

| layer | vLLM spec | sparse branch reads | SWA branch reads |
|---|---|---|---|
| full | FullAttentionSpec | — | — |
| sparse, `"sparse_branch"`, SWA on (paper) | SlidingWindowSpec(window) | full layer's pages | own window pages |
| sparse, `"sparse_branch"`, `swa=False` | none (shares the full layer's) | full layer's pages | — |
| sparse, `"both"` | none (shares the full layer's) | full layer's pages | full layer's pages |
| sparse, `"none"` / training-free merge | FullAttentionSpec (own) | own pages | own pages |
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ...checkpoint import META, SCHEDULE
from ...schedule import Schedule


@dataclass(frozen=True)
class LayerRole:
    """One attention layer as served: `role` "full" | "sparse"; for sparse layers which pages each branch reads."""

    index: int
    role: str
    block_size: int
    nsel: int  # blocks a full layer selects per token and KV group (its kv_source's for a sparse layer)
    window: int  # SWA window in tokens; 0 = no SWA branch
    merge: bool  # training-free: one softmax over selected blocks ∪ window of the layer's own K/V
    kv_source: int | None  # index of the full layer whose pages and indices a sparse layer reads
    shared: str  # "source" | "own": the pages the sparse (or merged) branch reads
    win: str  # "own" | "source" | "none": the pages the SWA branch reads
    cache: str  # "full" | "window" | "none": what the layer keeps (the vLLM spec)

    def describe(self) -> str:
        if self.role == "full":
            return f"layer {self.index}: full, selects {self.nsel} blocks of {self.block_size}"
        return (f"layer {self.index}: sparse (reads layer {self.kv_source}), cache={self.cache}, "
                f"window={self.window or 'none'}, merge={self.merge}")


def role_of(spec) -> LayerRole:
    """A schedule `LayerSpec` -> its `LayerRole` (the table in this module's docstring)."""
    nsel = spec.topk // spec.block_size
    if spec.role == "full":
        return LayerRole(spec.index, "full", spec.block_size, nsel, 0, False, None, "own", "none", "full")
    window = int(spec.window) if spec.window is not None else 0
    if spec.merge or spec.kv_sharing == "none":
        return LayerRole(spec.index, "sparse", spec.block_size, nsel, window, bool(spec.merge), spec.kv_source,
                         "own", "own" if window else "none", "full")
    if spec.kv_sharing == "both":
        return LayerRole(spec.index, "sparse", spec.block_size, nsel, window, False, spec.kv_source, "source",
                         "source" if window else "none", "none")
    if not window:
        return LayerRole(spec.index, "sparse", spec.block_size, nsel, 0, False, spec.kv_source, "source", "none",
                         "none")
    return LayerRole(spec.index, "sparse", spec.block_size, nsel, window, False, spec.kv_source, "source", "own",
                     "window")


def is_checkpoint(model_dir) -> bool:
    """Whether `model_dir` is a local HySparse checkpoint (has hysparse.json and schedule.json)."""
    path = Path(str(model_dir))
    return (path / META).is_file() and (path / SCHEDULE).is_file()


@dataclass(frozen=True)
class ServedCheckpoint:
    """The schedule of a checkpoint and what vLLM needs from it."""

    directory: Path
    schedule: Schedule
    roles: tuple[LayerRole, ...]
    meta: dict

    @classmethod
    def load(cls, model_dir, num_layers: int) -> "ServedCheckpoint":
        directory = Path(str(model_dir))
        meta = json.loads((directory / META).read_text())
        schedule = Schedule.load(directory / SCHEDULE)
        if len(schedule) != num_layers:
            raise ValueError(f"{directory / SCHEDULE}: the schedule has {len(schedule)} layers (pattern "
                             f"{schedule.pattern!r}) but config.json has num_hidden_layers={num_layers}")
        return cls(directory, schedule, tuple(role_of(s) for s in schedule.layers), meta)
