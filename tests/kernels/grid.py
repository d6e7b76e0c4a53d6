"""The one shape grid every backend is checked against the float64 oracle on (tests/kernels/test_grid_*.py,
tests/runtime/test_extend_oracle.py).

A `Case` is one sparse-layer configuration and the full layer that feeds it. Together the cases cover: T not a
multiple of the block, T < top-k, T < window, GQA groups 1/4/8/16, batch > 1 (decode and extend: different cache
lengths / start positions per row), random gates (sigmoid of normals, never 0.5) and sinks (normals, never 0),
every ablation (kv_sharing sparse_branch/none/both, swa off, merge), per-channel and per-head gates, and the
paper's head dim 128 and block 64. Each test crosses the cases with dtypes and backends; `point(...)` marks the
points outside the default sample `full_grid` (run them with `pytest --full`).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import pytest
import torch

from oracle import random_indices, random_selection

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = torch.cuda.is_available() or INTERPRET
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class Case:
    name: str
    B: int
    Hq: int
    Hkv: int
    T: int
    d: int
    block: int
    nsel: int
    window: int | None  # None: swa=False
    gates: str | None  # "element" | "head" | None
    sinks: bool
    kv_sharing: str = "sparse_branch"  # "sparse_branch" | "none" | "both"
    merge: bool = False  # training-free: one softmax over selected + window keys of the layer's own K/V

    @property
    def topk(self) -> int:
        return self.nsel * self.block

    @property
    def G(self) -> int:
        return self.Hq // self.Hkv

    def cache_lens(self) -> torch.Tensor:
        """Decode: int32 [B], a different cache length per row: the last row fills the cache of T slots, the others
        end on a block boundary (the next block, starting right after the new token, must not be a candidate)."""
        edge = self.T // self.block * self.block
        first = edge if 0 < edge < self.T else self.T - 7
        return torch.tensor([first - 7 * (self.B - 2 - b) for b in range(self.B - 1)] + [self.T], dtype=torch.int32)

    def extend_rows(self) -> tuple[int, torch.Tensor]:
        """Extend: (R new tokens per row, start int64 [B]), a different start per row; start + R <= T."""
        R = 5
        return R, torch.tensor([self.T - R - 9 * (self.B - 1 - b) for b in range(self.B)], dtype=torch.int64)


CASES = [
    Case("g1_T45_elem", B=2, Hq=2, Hkv=2, T=45, d=16, block=16, nsel=2, window=20, gates="element", sinks=True),
    Case("g4_T50_head_kvnone", B=2, Hq=8, Hkv=2, T=50, d=32, block=16, nsel=3, window=7, gates="head", sinks=True,
         kv_sharing="none"),
    Case("g8_T37_noswa_Tlt_topk", B=1, Hq=8, Hkv=1, T=37, d=16, block=16, nsel=4, window=None, gates="element",
         sinks=True),
    Case("g16_T33_Tlt_window_kvboth", B=2, Hq=16, Hkv=1, T=33, d=16, block=16, nsel=2, window=40, gates="head",
         sinks=False, kv_sharing="both"),
    Case("g4_T41_merge", B=2, Hq=8, Hkv=2, T=41, d=16, block=16, nsel=2, window=9, gates=None, sinks=True,
         kv_sharing="none", merge=True),
    Case("g1_T30_merge_nosink_Tlt_topk", B=1, Hq=2, Hkv=2, T=30, d=16, block=16, nsel=3, window=5, gates=None,
         sinks=False, kv_sharing="none", merge=True),
    Case("g4_T47_block32", B=2, Hq=4, Hkv=1, T=47, d=16, block=32, nsel=1, window=12, gates="element", sinks=True),
    Case("paper_d128_b64", B=1, Hq=2, Hkv=1, T=80, d=128, block=64, nsel=1, window=24, gates="element", sinks=True),
]
PAPER = CASES[-1]
BY_NAME = {c.name: c for c in CASES}

DTYPES = [torch.float32, torch.bfloat16]
FWD_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}
GRAD_TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 5e-2}


def dtype_id(dtype) -> str:
    return str(dtype).replace("torch.", "")


def point(*values, sample: bool, id: str | None = None):
    """A grid point (pytest param); outside the default sample it is marked `full_grid` (runs with --full)."""
    marks = () if sample else (pytest.mark.full_grid,)
    return pytest.param(*values, marks=marks, id=id)


def alternate(i: int, j: int) -> bool:
    """Default-sample rule for cheap backends: case i in dtype j when i + j is even (each case once, the dtypes
    alternating down the case list)."""
    return (i + j) % 2 == 0


def points(backends, default, cases=None):
    """pytest params (case, dtype, backend) for cases x DTYPES x backends. `default[backend]` says which points
    run by default: a set of (case name, dtype id) pairs, or a rule (i, j) -> bool on the positions of the case
    and the dtype; every other point is marked `full_grid`."""
    cases = CASES if cases is None else cases
    out = []
    for i, case in enumerate(cases):
        for j, dt in enumerate(DTYPES):
            for be in backends:
                rule = default.get(be, ())
                sample = rule(i, j) if callable(rule) else (case.name, dtype_id(dt)) in rule
                out.append(point(case, dt, be, sample=sample, id=f"{case.name}-{dtype_id(dt)}-{be}"))
    return out


# ---------------------------------------------------------------------------------------------- inputs
def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def sparse_leaves(case: Case, dtype, seed: int = 0) -> dict:
    """The independent tensors of one sparse layer (float64 values rounded through `dtype`, then cast to it):
    q, the layer's own k/v, the full layer's k/v, gates (per-channel as a strided view of one projection, as HF
    makes them), sinks; indices (random valid selection)."""
    gen = torch.Generator().manual_seed(seed)
    B, Hq, Hkv, T, d = case.B, case.Hq, case.Hkv, case.T, case.d
    x = dict(q=_randn(gen, B, Hq, T, d), k_own=_randn(gen, B, Hkv, T, d), v_own=_randn(gen, B, Hkv, T, d),
             k_full=_randn(gen, B, Hkv, T, d), v_full=_randn(gen, B, Hkv, T, d), gate_sparse=None, gate_swa=None,
             sinks=_randn(gen, Hq) if case.sinks else None)
    if case.gates == "element":
        both = torch.sigmoid(_randn(gen, B, T, Hq, 2 * d))
        x["gate_sparse"], x["gate_swa"] = both[..., :d].transpose(1, 2), both[..., d:].transpose(1, 2)
    elif case.gates == "head":
        x["gate_sparse"], x["gate_swa"] = (torch.sigmoid(_randn(gen, B, Hq, T, 1)) for _ in range(2))
    if case.window is None:
        x["gate_swa"] = None
    x = {k: None if v is None else v.to(dtype) for k, v in x.items()}
    x["indices"] = random_indices(B, Hkv, T, case.block, case.nsel, gen)
    return x


def wire(case: Case, x: dict) -> dict:
    """The op's arguments from the leaves, as the compiler wires each ablation (docs/design.md):
    sparse_branch: own K/V for the window, the full layer's for the sparse branch; none (and merge): own K/V for
    both; both: the full layer's K/V for both. Shared tensors are passed twice (autograd sums their gradients)."""
    own, full = (x["k_own"], x["v_own"]), (x["k_full"], x["v_full"])
    own_kv, shared_kv = {"sparse_branch": (own, full), "none": (own, own), "both": (full, full)}[case.kv_sharing]
    return dict(q=x["q"], k_own=own_kv[0], v_own=own_kv[1], k_shared=shared_kv[0], v_shared=shared_kv[1],
                indices=x["indices"], gate_sparse=x["gate_sparse"], gate_swa=x["gate_swa"], sinks=x["sinks"])


def full_qkv(case: Case, dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    B, Hq, Hkv, T, d = case.B, case.Hq, case.Hkv, case.T, case.d
    return tuple(_randn(gen, *s).to(dtype) for s in ((B, Hq, T, d), (B, Hkv, T, d), (B, Hkv, T, d)))


def dout_like(shape, dtype, seed: int = 99):
    return _randn(torch.Generator().manual_seed(seed), *shape).to(dtype)


def ring_buffer(k_linear: torch.Tensor, cache_len: torch.Tensor, W: int, seed: int = 7) -> torch.Tensor:
    """[B, Hkv, W, d] SWA ring: position p of each row in slot p % W for the last W positions before cache_len[b];
    every other slot holds garbage (large values a wrong slot rule would pick up)."""
    B, H, _, d = k_linear.shape
    buf = 50 * _randn(torch.Generator().manual_seed(seed), B, H, W, d).to(k_linear.dtype)
    for b in range(B):
        t = int(cache_len[b]) - 1
        p = torch.arange(max(0, t - W + 1), t + 1)
        buf[b, :, p % W] = k_linear[b, :, p]
    return buf


def decode_selection(case: Case, cache_len, seed: int = 3) -> torch.Tensor:
    """int32 [B, Hkv, 1, nsel]: a random valid selection for each row's new token."""
    return random_selection((cache_len.long() - 1).view(-1, 1), case.Hkv, case.block, case.nsel,
                            torch.Generator().manual_seed(seed))


def ring_then_new(k_own: torch.Tensor, start: torch.Tensor, R: int, W: int):
    """The SWA keys as the runtime passes them to `sparse_attention_extend`: the W ring slots (slot s holds the
    latest position p < start[b] with p % W == s; empty slots: garbage at position -1), then the R new tokens.
    -> keys [B, Hkv, W + R, d], positions int64 [B, W + R]."""
    B, H, _, d = k_own.shape
    keys = 50 * torch.randn(B, H, W + R, d, generator=torch.Generator().manual_seed(21)).to(k_own.dtype)
    pos = torch.full((B, W + R), -1, dtype=torch.int64)
    for b in range(B):
        s0 = int(start[b])
        for p in range(max(0, s0 - W), s0):
            keys[b, :, p % W], pos[b, p % W] = k_own[b, :, p], p
        keys[b, :, W:], pos[b, W:] = k_own[b, :, s0:s0 + R], torch.arange(s0, s0 + R)
    return keys, pos


def sparse_decode_inputs(case: Case, dtype):
    """One decode step of the sparse layer, a different length per row: (q, k_win, v_win, k_shared, v_shared,
    indices, cache_len, gate_sparse, gate_swa, sinks). The new token of row b is at t = cache_len[b] - 1; the SWA
    keys are a ring of W = window + 3 slots (stale slots hold garbage), the shared cache holds garbage past t."""
    w = wire(case, sparse_leaves(case, dtype, seed=4))
    cache_len = case.cache_lens()
    t = cache_len.long() - 1
    W = (case.window or 8) + 3

    def row(x):  # [B, H, T, e] -> the row of each batch at t[b]: [B, H, 1, e]
        return None if x is None else x[torch.arange(x.shape[0]), :, t].unsqueeze(2).contiguous()

    return (row(w["q"]), ring_buffer(w["k_own"], cache_len, W), ring_buffer(w["v_own"], cache_len, W, seed=8),
            stale_tail(w["k_shared"], cache_len), stale_tail(w["v_shared"], cache_len, seed=12),
            decode_selection(case, cache_len), cache_len, row(w["gate_sparse"]), row(w["gate_swa"]), w["sinks"])


def stale_tail(x: torch.Tensor, lengths, seed: int = 11) -> torch.Tensor:
    """A copy of a cache [B, H, S, d] whose slots at and after lengths[b] hold large garbage (must be ignored)."""
    x = x.clone()
    gen = torch.Generator().manual_seed(seed)
    for b, n in enumerate(lengths.tolist()):
        x[b, :, n:] = 50 * _randn(gen, *x[b, :, n:].shape).to(x.dtype)
    return x


# ---------------------------------------------------------------------------------------------- backends
CHUNK_ROWS = 7  # forced query chunk: 7 rows, so chunk edges fall inside key blocks and the last chunk is partial


@contextlib.contextmanager
def run_as(spec: str, rows_logits: int, rows: int = CHUNK_ROWS):
    """Run the block with backend `spec` and yield the backend name to pass to the ops.

    spec: "reference" | "reference-chunked" | "flex" | "triton" | "triton-token" | "triton-block". "-chunked" and
    "flex" force query chunks of `rows` rows (`rows_logits`: logits in one query row, B * Hq * keys) in the
    reference ops, `runtime.extend` and flex's block scoring; "triton-token"/"triton-block" force the sparse
    layer's loop order (forward and backward; the full layer has one)."""
    from hysparse_compile.kernels import flex, reference

    name = spec.split("-")[0]
    if name == "triton" and not HAS_TRITON:
        pytest.skip("triton needs CUDA or TRITON_INTERPRET=1")
    with contextlib.ExitStack() as stack:
        if spec in ("reference-chunked", "flex"):
            n = rows * rows_logits
            stack.enter_context(reference.query_chunk_elems(n))
            stack.enter_context(flex.scoring_chunk_elems(n))
        if spec in ("triton-token", "triton-block"):
            from hysparse_compile.kernels.triton import sparse_attention as tsa

            stack.enter_context(tsa.forward_order(spec.split("-")[1]))
        yield name


# ---------------------------------------------------------------------------------------------- selection
def assert_valid_selection(idx: torch.Tensor, pos: torch.Tensor, block: int, nsel: int) -> None:
    """The index contract (docs/design.md): int32 [B, Hkv, R, nsel], ascending distinct candidate blocks
    (j * block <= pos), -1 padding at the end only."""
    assert idx.dtype == torch.int32 and idx.shape[-1] == nsel
    i = idx.long()
    real = i >= 0
    assert bool((i >= -1).all()), "indices below -1"
    assert bool((real[..., 1:] <= real[..., :-1]).all()), "-1 padding must come last"
    assert bool(((i[..., 1:] > i[..., :-1]) | ~real[..., 1:]).all()), "real indices must ascend strictly"
    assert bool((~real | (i * block <= pos.view(pos.shape[0], 1, -1, 1))).all()), "a selected block is in the future"


def assert_selection_matches(idx, ref_idx, ref_scores, Hkv: int, pos, block: int, rtol: float = 1e-5) -> None:
    """`idx` is the oracle's selection `ref_idx`, except in rows where the oracle's group scores of the two picks
    agree to `rtol` (near ties that rounding may order either way); such rows stay rare."""
    nsel = ref_idx.shape[-1]
    assert_valid_selection(idx, pos, block, nsel)
    same = (idx.long() == ref_idx).all(-1)  # [B, Hkv, R]
    if bool(same.all()):
        return
    B, Hq, R, nb = ref_scores.shape
    group = ref_scores.view(B, Hkv, Hq // Hkv, R, nb).amax(2)  # [B, Hkv, R, nb]

    def picked(ix):
        s = torch.gather(group, -1, ix.long().clamp_min(0))
        return torch.where(ix >= 0, s, torch.full_like(s, -1.0)).sort(-1, descending=True).values

    rows = ~same
    torch.testing.assert_close(picked(idx)[rows], picked(ref_idx)[rows], rtol=rtol, atol=1e-12)
    assert same.float().mean() > 0.97, f"{int(rows.sum())} rows differ from the oracle"
