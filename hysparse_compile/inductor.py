"""Inductor options for `torch.compile` of a compiled model, chosen from what was measured on the GPU.

    >>> fast = torch.compile(compiled, options=hs.inductor_options())

On torch older than 2.13, Inductor's peak-memory reordering (`reorder_for_peak_memory`, on by default) schedules the
HySparse model's one graph badly. Measured on torch 2.11 (H100, 2026-12-06; docs/benchmarks.md, "Ninth session"):

- in the training step it puts every weight gradient after the last attention backward, so every output gradient
  lives to the end of the backward;
- in the forward it keeps two blocks of the MLP's width (`[T, intermediate]`) alive across a sparse layer.

Turning the reordering off lowered the training peak at 8k from 1.128x to 1.055x the compiled original's, and the
forward's from 8.19 to 7.35 GiB at 32k and from 19.23 to 15.86 GiB at 128k. Speed stayed within the runs' spread,
and the original's peaks did not move. torch 2.13's Inductor orders the weight gradients well with the reordering on
(CPU, 57-58 of 62 before the last attention backward), so there this returns no options. torch 2.12 was not
measured; it is treated as 2.11.
"""
from __future__ import annotations

import re

# the first torch release whose default reordering is kept (its Inductor interleaves the weight gradients)
GOOD_REORDER = (2, 13)


def _release(version: str) -> tuple[int, int]:
    """(major, minor) of a torch version string such as '2.11.0+cu130' or '2.13.0.dev20261001'."""
    m = re.match(r"(\d+)\.(\d+)", version)
    if not m:
        raise ValueError(f"inductor_options: torch_version={version!r} is not a version such as '2.11.0'")
    return int(m.group(1)), int(m.group(2))


def inductor_options(torch_version: str | None = None) -> dict:
    """Options to pass as `torch.compile(compiled, options=...)`: `{"reorder_for_peak_memory": False}` on torch
    older than 2.13 (`torch_version`, default the installed torch), `{}` from 2.13 on.

    >>> inductor_options("2.11.0+cu130")
    {'reorder_for_peak_memory': False}
    >>> inductor_options("2.13.0")
    {}
    """
    if torch_version is None:
        import torch

        torch_version = torch.__version__
    if _release(str(torch_version)) < GOOD_REORDER:
        return {"reorder_for_peak_memory": False}
    return {}


__all__ = ["inductor_options"]
