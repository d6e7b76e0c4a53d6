"""KV memory plan: exact bytes per layer and in total, and the largest batch / context a budget holds."""
import random

import pytest
import torch

from hysparse_compile.kv_plan import parse_bytes, plan_kv
from hysparse_compile.schedule import Schedule

BF16_TOKEN_80B = 2 * 4 * 128 * 2  # K and V, 4 KV heads, d=128, bf16: 2048 bytes per token per layer
BF16_TOKEN_7B = 2 * 8 * 128 * 2


def _plan(schedule, **kw):
    args = dict(num_kv_heads=4, head_dim=128, batch=1, seq_len=32768, dtype="bfloat16")
    args.update(kw)
    return plan_kv(schedule, **args)


def test_80b_preset_total_matches_paper_figure():
    plan = _plan(Schedule.preset("hysparse-80b-a3b"))
    assert plan.total_bytes == 5 * 2048 * 32768 + 44 * 2048 * 128
    assert plan.baseline_bytes == 49 * 2048 * 32768
    assert plan.ratio == pytest.approx(49 * 32768 / (5 * 32768 + 44 * 128))


def test_7b_preset_keeps_ten_full_caches_and_26_ring_buffers():
    plan = _plan(Schedule.preset("hysparse-7b"), num_kv_heads=8, seq_len=131072, batch=3)
    assert [r.index for r in plan.per_layer if r.role == "full"] == [0, 4, 8, 12, 16, 20, 24, 28, 32, 35]
    assert plan.total_bytes == 3 * BF16_TOKEN_7B * (10 * 131072 + 26 * 128)
    assert plan.baseline_bytes == 3 * BF16_TOKEN_7B * 36 * 131072


def test_sparse_layer_row_says_what_it_stores():
    rows = _plan(Schedule.from_pattern("FSS", block_size=16, topk=64, window=32)).per_layer
    assert rows[0].stores == "full cache" and rows[0].bytes == BF16_TOKEN_80B * 32768
    assert rows[1].stores.startswith("SWA ring buffer of 32 tokens") and "layer 0" in rows[1].stores
    assert rows[2].bytes == BF16_TOKEN_80B * 32


def test_ring_buffer_is_capped_at_context_length():
    plan = _plan(Schedule.from_pattern("FS", window=128), seq_len=50, batch=2)
    assert plan.per_layer[1].bytes == 2 * BF16_TOKEN_80B * 50
    assert plan.total_bytes == plan.baseline_bytes


def test_kv_sharing_both_stores_nothing_in_sparse_layers():
    plan = _plan(Schedule.from_pattern("FSSF", kv_sharing="both"))
    assert [r.bytes for r in plan.per_layer] == [BF16_TOKEN_80B * 32768, 0, 0, BF16_TOKEN_80B * 32768]
    assert plan.per_layer[2].stores == "nothing (reads layer 0)"


def test_swa_off_stores_nothing_in_sparse_layers():
    plan = _plan(Schedule.from_pattern("FSS", swa=False))
    assert plan.total_bytes == BF16_TOKEN_80B * 32768
    assert "nothing (reads layer 0)" in {r.stores for r in plan.per_layer}


def test_kv_sharing_none_keeps_a_full_own_cache():
    plan = _plan(Schedule.from_pattern("FSSS", kv_sharing="none"), seq_len=4096)
    assert all(r.bytes == BF16_TOKEN_80B * 4096 for r in plan.per_layer)
    assert plan.total_bytes == plan.baseline_bytes and plan.ratio == 1.0


def test_training_free_keeps_a_full_own_cache():
    plan = _plan(Schedule.hybrid(8, 3, mode="training_free"), seq_len=1000)
    assert plan.total_bytes == plan.baseline_bytes == 8 * BF16_TOKEN_80B * 1000
    assert "training-free" in plan.per_layer[1].stores


def test_per_layer_window_override_changes_only_that_layer():
    plan = _plan(Schedule.from_pattern("FSSS", window=128, overrides={2: {"window": 512}}))
    assert [r.bytes for r in plan.per_layer[1:]] == [BF16_TOKEN_80B * w for w in (128, 512, 128)]


def test_total_matches_brute_force_over_random_schedules():
    rng = random.Random(1234)
    for _ in range(20):
        pattern = "F" + "".join(rng.choice("FS") for _ in range(rng.randint(0, 12)))
        window, seq_len, batch = rng.choice([16, 100, 4096]), rng.randint(1, 9000), rng.randint(1, 5)
        hkv, d, dtype, size = rng.randint(1, 8), rng.choice([64, 80, 128]), *rng.choice([("float32", 4),
                                                                                         (torch.float16, 2)])
        plan = plan_kv(Schedule.from_pattern(pattern, window=window), num_kv_heads=hkv, head_dim=d,
                       batch=batch, seq_len=seq_len, dtype=dtype)
        tokens = sum(seq_len if c == "F" else min(window, seq_len) for c in pattern)
        assert plan.total_bytes == 2 * hkv * d * size * batch * tokens
        assert plan.bytes_for(batch, seq_len) == plan.total_bytes


def test_decode_indices_are_listed_but_not_counted():
    plan = _plan(Schedule.preset("hysparse-80b-a3b"), batch=2)
    assert plan.indices_bytes == 5 * 4 * 2 * 4 * (1024 // 64)
    assert plan.total_bytes == 2 * (5 * 2048 * 32768 + 44 * 2048 * 128)
    assert "not counted" in str(plan)


def test_max_batch_fits_and_one_more_does_not():
    plan = _plan(Schedule.preset("hysparse-80b-a3b"))
    budget = 80 * 2**30
    for baseline in (False, True):
        b = plan.max_batch(budget, 131072, baseline=baseline)
        assert plan.bytes_for(b, 131072, baseline=baseline) <= budget < plan.bytes_for(b + 1, 131072, baseline=baseline)
    assert plan.max_batch(budget, 131072) > 9 * plan.max_batch(budget, 131072, baseline=True)


def test_max_seq_len_fits_and_one_more_does_not():
    plan = _plan(Schedule.preset("hysparse-7b"), num_kv_heads=8)
    for budget in (80 * 10**9, 80 * 2**30, 123_456_789):
        for batch, baseline in ((1, False), (4, False), (1, True), (7, True)):
            n = plan.max_seq_len(budget, batch, baseline=baseline)
            assert plan.bytes_for(batch, n, baseline=baseline) <= budget
            assert plan.bytes_for(batch, n + 1, baseline=baseline) > budget


def test_max_seq_len_is_exact_when_budget_equals_a_plan():
    plan = _plan(Schedule.from_pattern("FSSS", window=64))
    for n in (1, 63, 64, 65, 32768):  # below, at and past the window, where the growth rate changes
        assert plan.max_seq_len(plan.bytes_for(2, n), 2) == n
        assert plan.max_seq_len(plan.bytes_for(2, n) - 1, 2) == n - 1


def test_nothing_fits_in_a_tiny_budget():
    plan = _plan(Schedule.preset("hysparse-7b"))
    assert plan.max_seq_len(100, 1) == 0
    assert plan.max_batch(100, 32768) == 0


def test_budget_strings_are_exact():
    assert parse_bytes("80GiB") == 80 * 2**30
    assert parse_bytes("80GB") == 80 * 10**9
    assert parse_bytes("1.5 KiB") == 1536
    assert parse_bytes(12345) == 12345
    plan = _plan(Schedule.preset("hysparse-80b-a3b"))
    assert plan.max_batch("80GiB") == plan.max_batch(80 * 2**30)


@pytest.mark.parametrize("value", ["80 parsecs", "-3GB", "0.3B", True, 0])
def test_bad_budget_is_rejected(value):
    with pytest.raises(ValueError, match="budget"):
        parse_bytes(value)


@pytest.mark.parametrize("arg, value", [("num_kv_heads", 0), ("head_dim", -128), ("batch", True),
                                        ("seq_len", 1.5), ("seq_len", "32k")])
def test_bad_sizes_are_rejected_naming_the_argument(arg, value):
    with pytest.raises(ValueError, match=arg):
        _plan(Schedule.preset("hysparse-7b"), **{arg: value})


def test_unknown_dtype_is_rejected_listing_valid_ones():
    with pytest.raises(ValueError, match="dtype.*'fp13'.*bfloat16"):
        _plan(Schedule.preset("hysparse-7b"), dtype="fp13")


def test_torch_dtype_and_short_names_are_accepted():
    s = Schedule.preset("hysparse-7b")
    assert _plan(s, dtype=torch.bfloat16).total_bytes == _plan(s, dtype="bf16").total_bytes
    assert _plan(s, dtype=torch.float32).total_bytes == 2 * _plan(s, dtype="fp16").total_bytes


def test_num_layers_must_match_the_schedule():
    with pytest.raises(ValueError, match="num_layers.*32.*36"):
        _plan(Schedule.preset("hysparse-7b"), num_layers=32)
    assert len(_plan(Schedule.preset("hysparse-7b"), num_layers=36).per_layer) == 36


def test_table_shows_every_layer_and_the_totals():
    plan = _plan(Schedule.preset("hysparse-80b-a3b"))
    text = str(plan)
    assert text.count("full cache") == 5 and text.count("SWA ring buffer of 128 tokens") == 44
    assert "331.0 MiB" in text and "full attention" in text and f"{plan.ratio:.2f}x" in text
