"""Model-level exactness with real selection (top-k < T): a compiled HF Llama against an independent computation of
the same model — the original module with its attention replaced by the float64 oracle's HySparse attention
(tests/oracle_model.py: full layers select blocks with `oracle_full`, sparse layers run `oracle_sparse` with the
compiled model's gate weights and sinks and the preceding full layer's K/V and indices). Whole-sequence forwards,
left-padded batches, and the KV-cache runtime (prefill, decode, extend) are all held to the same oracle logits.

The Llama's query/key projections are scaled up (peaked attention), so block scores are far apart and float32 and
float64 select the same blocks; gates and sinks are random (oracle_model.randomize_new_weights)."""
import functools

import pytest
import torch
from models import hf_model, sharpen
from oracle_model import OracleHySparseLlama, randomize_new_weights

import hysparse_compile as hs
from hysparse_compile.runtime import HySparseCache

BLOCK, TOPK, WINDOW = 16, 32, 16  # 2 of up to 4 blocks selected at T = 60
T = 60
PATTERN = "FSFS"  # two full layers: layer 3 must read layer 2's K/V and indices, not layer 0's
TOL = 1e-4  # fp32 logits against float64, relative to the largest; measured 4.0e-7 - 6.4e-7
CHUNKS = (30, 1, 1, 1, 5, 1, 17, 1, 1, 2)  # prefill, decode steps, extend chunks (17 > window: the ring wraps inside)


def rel(got, want) -> float:
    return ((got.double() - want).abs().max() / want.abs().max()).item()


def sharp_llama(layers: int):
    model = hf_model("llama", "sdpa", layers=layers, heads=4, kv_heads=2, seed=0)
    return sharpen(model, 8.0)


@functools.lru_cache(maxsize=None)
def pair(mode: str = "paper", **options):
    """(compiled model, float64 logits of `ids()` [2, T, V] from the oracle model of the same weights and schedule)."""
    original = sharp_llama(len(PATTERN))
    schedule = hs.Schedule.from_pattern(PATTERN, block_size=BLOCK, topk=TOPK, window=WINDOW, mode=mode, **options)
    compiled = hs.compile(original, schedule)
    new = randomize_new_weights(compiled)
    assert (mode == "training_free") == (not new)  # the training-free mode adds no weights
    oracle = OracleHySparseLlama(original, PATTERN, block_size=BLOCK, topk=TOPK, window=WINDOW,
                                 kv_sharing=options.get("kv_sharing", "sparse_branch"), swa=options.get("swa", True),
                                 merge=mode == "training_free", params=compiled.state_dict())
    return compiled, oracle.logits(ids())


def ids():
    return torch.randint(0, 128, (2, T), generator=torch.Generator().manual_seed(3))


def full_grid(*values, **kwargs):
    return pytest.param(*values, marks=pytest.mark.full_grid, **kwargs)


MODES = [  # (mode, schedule options)
    pytest.param("paper", {}, id="paper"),
    pytest.param("training_free", {}, id="training_free"),
    full_grid("paper", {"kv_sharing": "none"}, id="kv_sharing_none"),
    full_grid("paper", {"kv_sharing": "both"}, id="kv_sharing_both"),
    full_grid("paper", {"swa": False}, id="no_swa"),
    full_grid("paper", {"gate": "head"}, id="head_gates"),
]


@pytest.mark.parametrize("mode, options", MODES)
def test_compiled_model_with_real_selection_equals_the_oracle_model(mode, options):
    compiled, want = pair(mode, **options)
    with torch.no_grad():
        got = compiled(ids()).logits
    assert rel(got, want) <= TOL


def test_oracle_model_depends_on_gates_sinks_and_selection():
    """The comparison above has teeth: the oracle model's logits move by far more than TOL when a sparse layer's
    gates or sinks are dropped, or when every block is selected instead of the top 2 (row 0, its first 40 tokens:
    3 blocks)."""
    compiled, want = pair("paper")
    params = compiled.state_dict()
    variants = {
        "no sinks": dict(params={k: v for k, v in params.items() if not k.endswith("sinks")}),
        "no gates": dict(params={k: v for k, v in params.items() if not k.endswith("gate.weight")}),
        "every block": dict(params=params, topk=3 * BLOCK),
    }
    for name, kwargs in variants.items():
        kwargs = {"topk": TOPK, **kwargs}
        other = OracleHySparseLlama(sharp_llama(len(PATTERN)), PATTERN, block_size=BLOCK, window=WINDOW, **kwargs)
        assert rel(other.logits(ids()[:1, :40]), want[:1, :40]) > 100 * TOL, name


@pytest.mark.parametrize("mode", ["paper", "training_free"])
def test_left_padded_rows_equal_the_oracle_model_of_each_row(mode):
    """Row 1 is the first 53 tokens of `ids()[1]`, left-padded by 7: its logits are the oracle's at those positions
    (causal: the oracle's first 53 positions see only those tokens)."""
    compiled, want = pair(mode)
    pad = 7
    x = ids()
    padded = torch.cat([torch.zeros(1, pad, dtype=x.dtype), x[1:, :T - pad]], 1)
    batch, mask = torch.cat([x[:1], padded]), torch.ones(2, T, dtype=torch.long)
    mask[1, :pad] = 0
    with torch.no_grad():
        got = compiled(batch, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    assert rel(got[0], want[0]) <= TOL
    assert rel(got[1, pad:], want[1, :T - pad]) <= TOL


def _cached(compiled, chunks):
    cache, out, t = HySparseCache(compiled), [], 0
    with torch.no_grad():
        for n in chunks:
            out.append(compiled(ids()[:, t:t + n], past_key_values=cache, use_cache=True).logits)
            t += n
    return torch.cat(out, 1)


@pytest.mark.parametrize("mode", ["paper", "training_free"])
def test_cached_decode_equals_the_oracle_model(mode):
    """Prefill 10 tokens (fewer than a block and the window: a ring with empty slots), then 50 single-token decode
    steps (the runtime's decode ops over the cache and the ring, across blocks 16, 32, 48 and ring wraps), each
    step's logits against the oracle model's at that position."""
    compiled, want = pair(mode)
    got = _cached(compiled, (10,) + (1,) * (T - 10))
    errors = [rel(got[:, t], want[:, t]) for t in range(10, T)]
    assert max(errors) <= TOL, errors
    assert rel(got[:, :10], want[:, :10]) <= TOL


@pytest.mark.parametrize("mode", ["paper", full_grid("training_free")])
def test_cached_extend_equals_the_oracle_model(mode):
    """Calls of 30, 1, 1, 1, 5, 1, 17, 1, 1, 2 tokens (multi-token calls against a filled cache run the extend
    path; 17 tokens is more than the window)."""
    compiled, want = pair(mode)
    assert rel(_cached(compiled, CHUNKS), want) <= TOL
