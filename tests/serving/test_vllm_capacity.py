"""The KV capacity vLLM reports for a HySparse checkpoint against the same weights served with every layer full,
both under one KV budget (256 MiB, 32-token pages, 16k context): the ratio `plan_kv` predicts, up to vLLM's page
rounding and the in-flight tokens it reserves per window layer — and exactly the page-level count derived here."""
import json
import math

import pytest

pytest.importorskip("vllm", reason=__import__("conftest").NO_VLLM)

import tiny  # noqa: E402

import hysparse_compile as hs  # noqa: E402

PLAN_TOL = 0.02  # vLLM's page-level accounting against plan_kv's token-level bytes


@pytest.fixture(scope="module")
def capacity(engines):
    hysparse, full = engines.result("capacity-hysparse"), engines.result("capacity-full")
    directory = engines.dirs["capacity-hysparse"]
    schedule = hs.Schedule.load(directory / "schedule.json")
    config = json.loads((directory / "config.json").read_text())
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    plan = hs.plan_kv(schedule, num_kv_heads=config["num_key_value_heads"], head_dim=head_dim, batch=1,
                      seq_len=tiny.CAPACITY_CONTEXT, dtype="float32")
    return hysparse, full, schedule, plan


def test_both_engines_had_the_same_kv_budget(capacity):
    hysparse, full, _, _ = capacity
    assert hysparse["kv_cache_bytes"] == full["kv_cache_bytes"] == tiny.CAPACITY_BUDGET
    assert hysparse["page"] == full["page"] == tiny.CAPACITY_PAGE


def test_kv_blocks_grow_by_layers_over_full_layers(capacity):
    """vLLM lays one page of every KV cache group side by side; HySparse has 2 page-slots per block (the 2 full
    layers' group, 6 window layers in 3 groups sharing them), full attention 8: 4x the blocks."""
    hysparse, full, schedule, _ = capacity
    page_bytes = 2 * 2 * 32 * 4 * tiny.CAPACITY_PAGE  # K and V, 2 KV heads, d=32, float32
    assert full["num_blocks"] == tiny.CAPACITY_BUDGET // (len(schedule) * page_bytes)
    assert hysparse["num_blocks"] == tiny.CAPACITY_BUDGET // (schedule.num_full * page_bytes)


def test_max_concurrency_ratio_matches_plan_kv(capacity):
    hysparse, full, schedule, plan = capacity
    L, page, w = tiny.CAPACITY_CONTEXT, tiny.CAPACITY_PAGE, schedule.window
    # pages one request of L tokens holds: full attention cdiv(L, page) per block; HySparse the full group's
    # cdiv(L, page) plus, for each of its 3 window groups, vLLM's window allowance (window - 1 + in-flight tokens)
    window_pages = math.ceil((w - 1 + tiny.CAPACITY_STEP_TOKENS) / page) + 1
    groups = schedule.num_sparse // schedule.num_full
    assert full["max_concurrency"] == pytest.approx(full["num_blocks"] / math.ceil(L / page), rel=1e-12)
    assert hysparse["max_concurrency"] == pytest.approx(
        hysparse["num_blocks"] / (math.ceil(L / page) + groups * window_pages), rel=1e-12)
    ratio = hysparse["max_concurrency"] / full["max_concurrency"]
    assert ratio == pytest.approx(plan.ratio, rel=PLAN_TOL), f"vLLM {ratio:.4f} vs plan_kv {plan.ratio:.4f}"
    print(f"\ncapacity at {L} tokens: vLLM {hysparse['max_concurrency']:.2f} vs {full['max_concurrency']:.2f} "
          f"concurrent requests ({ratio:.4f}x), blocks {hysparse['num_blocks']} vs {full['num_blocks']}; "
          f"plan_kv {plan.ratio:.4f}x")
