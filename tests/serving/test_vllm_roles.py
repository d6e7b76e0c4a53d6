"""Each layer's served role and KV spec follow `kv_plan` for every mode; what is not supported is refused with an
error that names the setting."""
import json
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm", reason=__import__("conftest").NO_VLLM)

import hysparse_compile as hs  # noqa: E402
from hysparse_compile.serving.vllm.model import check_parallel  # noqa: E402
from hysparse_compile.serving.vllm.roles import ServedCheckpoint, is_checkpoint, role_of  # noqa: E402

SCHEDULES = {
    "paper": hs.Schedule.from_pattern("FSSFS", block_size=16, topk=64, window=32),
    "ablations": hs.Schedule.from_pattern("FSSSS", block_size=16, topk=32, window=32,
                                          overrides={1: {"kv_sharing": "none"}, 2: {"kv_sharing": "both"},
                                                     3: {"swa": False}}),
    "training_free": hs.Schedule.from_pattern("FSS", block_size=32, topk=64, window=16, mode="training_free"),
}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_each_layers_cache_is_what_kv_plan_plans(name):
    schedule = SCHEDULES[name]
    plan = hs.plan_kv(schedule, num_kv_heads=2, head_dim=32, batch=1, seq_len=4096, dtype="bfloat16")
    for spec, row in zip(schedule.layers, plan.per_layer):
        role = role_of(spec)
        expected = "full" if row.full_tokens else ("window" if row.ring_tokens else "none")
        assert role.cache == expected, (spec, row.stores)
        if role.cache == "window":
            assert role.window == row.ring_tokens
        if role.role == "sparse":
            assert role.nsel == spec.topk // spec.block_size and role.kv_source == spec.kv_source


def test_sparse_branches_read_the_pages_the_mode_says():
    roles = [role_of(s) for s in SCHEDULES["ablations"].layers]
    assert (roles[1].shared, roles[1].win) == ("own", "own")  # kv_sharing="none"
    assert (roles[2].shared, roles[2].win) == ("source", "source")  # "both": both branches on the full layer's
    assert (roles[3].shared, roles[3].win, roles[3].window) == ("source", "none", 0)  # swa=False
    assert (roles[4].shared, roles[4].win) == ("source", "own")  # the paper's
    merged = role_of(SCHEDULES["training_free"].layers[1])
    assert merged.merge and merged.shared == "own" and merged.cache == "full"


def test_a_schedule_that_does_not_fit_the_model_is_refused_naming_both(tmp_path):
    SCHEDULES["paper"].dump(tmp_path / "schedule.json")
    (tmp_path / "hysparse.json").write_text(json.dumps({"format": 1}))
    assert is_checkpoint(tmp_path) and not is_checkpoint(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="5 layers.*num_hidden_layers=4"):
        ServedCheckpoint.load(tmp_path, num_layers=4)


@pytest.mark.parametrize("field, value, match", [
    ("tensor_parallel_size", 2, "tensor_parallel_size=2 is not supported"),
    ("pipeline_parallel_size", 2, "pipeline_parallel_size=2 is not supported"),
    ("speculative_config", object(), "speculative_config"),
])
def test_unsupported_parallelism_and_speculation_are_refused_by_name(field, value, match):
    par = SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1)
    config = SimpleNamespace(parallel_config=par, speculative_config=None)
    check_parallel(config)  # the supported case passes
    if field == "speculative_config":
        config.speculative_config = value
    else:
        setattr(par, field, value)
    with pytest.raises(ValueError, match=match):
        check_parallel(config)


def test_the_backend_refuses_fp8_caches_and_softcapping_by_name():
    from hysparse_compile.serving.vllm.backend import HySparseAttentionImpl

    role = role_of(SCHEDULES["paper"].layers[0])
    with pytest.raises(ValueError, match="kv_cache_dtype='fp8'.*logits_soft_cap|logits_soft_cap.*kv_cache_dtype"):
        HySparseAttentionImpl(4, 32, 0.1, 2, kv_cache_dtype="fp8", logits_soft_cap=30.0, hysparse=role)
