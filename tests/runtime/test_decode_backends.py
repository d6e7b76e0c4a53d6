"""A whole tiny HF Llama compiled with backend="triton" (interpreted on CPU) and backend="flex", prefilled and
decoded through the cache (single tokens and an extend chunk), gives the reference backend's logits. On CPU
`backend="auto"` always resolves to the reference, so without this no test would run a whole model on the
kernels. Gates and sinks are random (not the 0.5 / 0 they start at) and the prefill is longer than top-k, so
selection is real."""
from __future__ import annotations

import functools

import pytest
import torch

import hysparse_compile as hs
from grid import HAS_TRITON
from models import cached_logits, hf_model

CHUNKS = (37, 1, 4, 1)  # prefill 37 tokens (3 blocks of 16 > top-k 32), a token, an extend of 4, a token


@functools.lru_cache(maxsize=None)
def _model():
    return hf_model("llama", "sdpa", layers=2)


def _compiled(backend: str):
    """The tiny Llama, pattern FS, compiled for `backend`, with the same random gates and sinks for every backend."""
    schedule = hs.Schedule.from_pattern("FS", block_size=16, topk=32, window=16, mode="paper")
    compiled = hs.compile(_model(), schedule, backend=backend)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in sorted(compiled.named_parameters()):
            if ".hysparse." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if "gate" in name else 1.0))
    return compiled


@functools.lru_cache(maxsize=None)
def _cached_logits(backend: str) -> torch.Tensor:
    compiled = _compiled(backend)
    ids = torch.randint(1, 128, (2, sum(CHUNKS)), generator=torch.Generator().manual_seed(1))
    return cached_logits(compiled, ids, CHUNKS)


@pytest.mark.parametrize("backend", ["flex", "triton"])
def test_compiled_model_decodes_like_the_reference_backend(backend):
    if backend == "triton" and not HAS_TRITON:
        pytest.skip("triton needs CUDA or TRITON_INTERPRET=1")
    got, want = _cached_logits(backend), _cached_logits("reference")
    assert got.shape == want.shape == (2, sum(CHUNKS), 128)
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5
