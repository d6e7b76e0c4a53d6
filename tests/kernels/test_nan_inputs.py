"""NaN inputs propagate, as in SDPA (docs/design.md, "NaN and empty inputs"): a NaN reaches exactly the outputs
whose softmax reads it, every other output is the clean result, and the indices stay valid (the indices of a row
whose scores saw a NaN are unspecified beyond that). Every backend."""
from __future__ import annotations

import pytest
import torch

from grid import assert_valid_selection, run_as
from hysparse_compile import functional as F
from oracle import prefill_positions

B, Hq, Hkv, T, d, BS = 1, 4, 2, 40, 16, 16
BACKENDS = ["reference", "flex", "triton"]


def _inputs(gen):
    return torch.randn(B, Hq, T, d, generator=gen), torch.randn(B, Hkv, T, d, generator=gen), torch.randn(
        B, Hkv, T, d, generator=gen)


def _assert_nan_exactly_at(out, clean, nan_rows):
    """nan_rows bool [B, Hq, T]: those rows are all NaN, the others equal the clean run."""
    assert bool(out[nan_rows].isnan().all())
    assert torch.equal(out[~nan_rows], clean[~nan_rows])


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_a_query_reaches_only_its_own_row(gen, backend):
    q, k, v = _inputs(gen)
    bad = q.clone()
    bad[0, 1, 20, 3] = float("nan")
    with run_as(backend, B * Hq * T) as name:
        clean, clean_idx = F.full_attention(q, k, v, block_size=BS, topk=32, backend=name)
        out, idx = F.full_attention(bad, k, v, block_size=BS, topk=32, backend=name)
    rows = torch.zeros(B, Hq, T, dtype=torch.bool)
    rows[0, 1, 20] = True
    _assert_nan_exactly_at(out, clean, rows)
    assert_valid_selection(idx, prefill_positions(B, T), BS, 2)
    touched = torch.zeros(B, Hkv, T, dtype=torch.bool)
    touched[0, 0, 20] = True  # head 1 is in KV group 0
    assert torch.equal(idx[~touched], clean_idx[~touched])


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_a_key_reaches_the_rows_at_and_after_it_in_its_group(gen, backend):
    q, k, v = _inputs(gen)
    bad = k.clone()
    bad[0, 1, 25, 0] = float("nan")
    with run_as(backend, B * Hq * T) as name:
        clean, _ = F.full_attention(q, k, v, block_size=BS, topk=32, backend=name)
        out, idx = F.full_attention(q, bad, v, block_size=BS, topk=32, backend=name)
    rows = torch.zeros(B, Hq, T, dtype=torch.bool)
    rows[0, 2:4, 25:] = True  # KV group 1 = query heads 2, 3; causal: tokens 25..
    _assert_nan_exactly_at(out, clean, rows)
    assert_valid_selection(idx, prefill_positions(B, T), BS, 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_a_shared_key_reaches_only_the_rows_that_selected_its_block(gen, backend):
    q, k, v = _inputs(gen)
    _, idx = F.full_attention(q, k, v, block_size=BS, topk=16)  # one block per token
    bad = k.clone()
    bad[0, 0, 5, 0] = float("nan")  # block 0 of group 0
    sinks = torch.randn(Hq, generator=gen)
    with run_as(backend, B * Hq * T) as name:
        clean = F.sparse_attention(q, k, v, k, v, idx, block_size=BS, window=4, sinks=sinks, backend=name)
        out = F.sparse_attention(q, k, v, bad, v, idx, block_size=BS, window=4, sinks=sinks, backend=name)
    picked = (idx[0, 0] == 0).any(-1) & (torch.arange(T) >= 5)  # tokens of group 0 that read key 5
    assert 0 < int(picked.sum()) < T - 5
    rows = torch.zeros(B, Hq, T, dtype=torch.bool)
    rows[0, 0:2] = picked
    _assert_nan_exactly_at(out, clean, rows)
