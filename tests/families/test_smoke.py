"""Families that compiled before issue #20 stay working: each compiles (FS, paper mode) and its cached decoding equals
a full re-run. One shared tiny config per family (tests/models.py `hf_smoke`), 2 layers, 24 tokens."""
import pytest
import torch
from family_setup import cached_logits, ids, rel

import hysparse_compile as hs
from models import SMOKE_FAMILIES, hf_smoke, logits


@pytest.mark.parametrize("family", SMOKE_FAMILIES)
def test_family_compiles_and_decodes_like_a_full_rerun(family):
    model = hf_smoke(family)
    compiled = hs.compile(model, hs.Schedule.from_pattern("FS", block_size=16, topk=32, window=16),
                          gate_init=lambda w: torch.nn.init.normal_(w, std=0.2))
    assert [s.role for s in compiled.schedule.layers] == ["full", "sparse"]
    tokens = ids(2, 24, seed=5)
    with torch.no_grad():
        full = logits(compiled(tokens))
    assert torch.isfinite(full).all()
    assert rel(cached_logits(compiled, tokens, chunks=(17, 1, 1, 5)), full) < 1e-4
