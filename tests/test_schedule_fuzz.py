"""Schedules fuzzed with hypothesis: any value in any field gives either a valid schedule that round-trips through
every file format, or a ValueError / TypeError that names the field it was given (never another exception, never a
half-built value)."""
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hysparse_compile.schedule import FILE_KEYS, Schedule

BASE = dict(pattern="FSSFS", block_size=16, topk=64, window=32)
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

junk = st.one_of(
    st.none(), st.booleans(), st.integers(-(2 ** 40), 2 ** 40), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.lists(st.integers(0, 3), max_size=3), st.dictionaries(st.text(max_size=3),
                                                                                       st.integers(), max_size=2),
)
plausible = {
    "pattern": st.text(alphabet="FSfs xX1\t", max_size=12),
    "block_size": st.one_of(st.sampled_from([8, 16, 24, 32, 48, 64, 128, 0, -16]), st.integers(-300, 300)),
    "topk": st.one_of(st.sampled_from([0, 16, 32, 48, 64, 100, 1024, -64]), st.integers(-2000, 2000)),
    "window": st.integers(-5, 300),
    "kv_sharing": st.sampled_from(["sparse_branch", "none", "both", "all", "Sparse_Branch", ""]),
    "swa": st.booleans(),
    "sinks": st.booleans(),
    "gate": st.sampled_from(["element", "head", "none", "channel", "ELEMENT"]),
    "mode": st.sampled_from(["paper", "training_free", "fast", ""]),
}
OVERRIDE_KEYS = ("window", "swa", "sinks", "gate", "kv_sharing", "topk", "block_size", "windw")
overrides = st.dictionaries(
    st.one_of(st.integers(-2, 7), st.text(alphabet="0123x", max_size=2)),
    st.dictionaries(st.sampled_from(OVERRIDE_KEYS), st.one_of(junk, st.integers(-3, 300), st.booleans()),
                    max_size=2),
    max_size=2,
)


def _shown(value) -> str:
    """How an error is expected to show the value it names."""
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return repr(value) if isinstance(value, str) else str(value)


def _round_trips(schedule: Schedule, tmp_path) -> None:
    for suffix in (".json", ".yaml", ".toml"):
        again = Schedule.load(schedule.dump(tmp_path / f"s{suffix}"))
        assert again == schedule and again.layers == schedule.layers, suffix
    assert Schedule.from_dict(schedule.to_dict()) == schedule


@SETTINGS
@given(field=st.sampled_from(sorted(plausible)), data=st.data())
def test_one_bad_field_is_named_with_its_value(field, data, tmp_path_factory):
    value = data.draw(st.one_of(plausible[field], junk), label=field)
    try:
        schedule = Schedule(**{**BASE, field: value})
    except (ValueError, TypeError) as error:
        text = str(error)
        named = field if field != "pattern" else ("pattern" if "pattern" in text else "layer 0")
        assert named in text, f"{field}={value!r}: {text}"
        if isinstance(value, (int, str)) and not isinstance(value, bool) and field != "pattern":
            assert _shown(value) in text or repr(value) in text, f"{field}={value!r}: {text}"
    else:
        assert getattr(schedule, field) is not None or value is None
        _round_trips(schedule, tmp_path_factory.mktemp("s"))


@SETTINGS
@given(value=overrides)
def test_bad_overrides_name_the_layer_or_the_field(value, tmp_path_factory):
    try:
        schedule = Schedule(**BASE, overrides=value)
    except (ValueError, TypeError) as error:
        text = str(error)
        assert "overrides" in text or "layer" in text or any(k in text for k in OVERRIDE_KEYS), text
    else:
        _round_trips(schedule, tmp_path_factory.mktemp("s"))
        for i, fields in schedule.overrides.items():
            for key, v in fields.items():
                if key == "window" and schedule.layers[i].window is not None:
                    assert schedule.layers[i].window == v


@SETTINGS
@given(kwargs=st.fixed_dictionaries({}, optional={k: st.one_of(plausible[k], junk) for k in plausible}))
def test_any_combination_fails_only_with_a_value_or_type_error(kwargs, tmp_path_factory):
    kwargs.setdefault("pattern", "FS")
    try:
        schedule = Schedule(**kwargs)
    except (ValueError, TypeError) as error:
        assert any(k in str(error) for k in (*FILE_KEYS, "letter", "layer")), str(error)
    else:
        _round_trips(schedule, tmp_path_factory.mktemp("s"))


@pytest.mark.parametrize("options, words", [
    (dict(gate_init="zero"), ["gate_init", "'zero'"]),
    (dict(sink_init="a"), ["sink_init", "'a'"]),
    (dict(sink_init=float("nan")), ["sink_init", "nan"]),
    (dict(save_branches=1), ["save_branches", "1"]),
    (dict(backend="cuda"), ["backend", "'cuda'"]),
    (dict(gate_inti=0.0), ["gate_inti", "gate_init"]),
])
def test_bad_compile_options_name_the_option_and_leave_the_model_untouched(options, words):
    from test_compile_errors import _fails, _schedule
    from models import build

    text = _fails(build("llama-sdpa"), _schedule(), None, exc=(TypeError, ValueError), **options)
    assert all(w in text for w in words), text
