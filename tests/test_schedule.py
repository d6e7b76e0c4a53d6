"""Schedule: construction, presets, overrides, files, and the validation errors of SPEC §3."""
import dataclasses

import pytest

from hysparse_compile import Schedule


def test_pattern_is_normalized_and_spaces_ignored():
    s = Schedule.from_pattern("F S s  S\nF")
    assert s.pattern == "FSSSF" and len(s) == 5 and s.num_full == 2 and s.num_sparse == 3


def test_sparse_layers_read_the_most_recent_full_layer():
    s = Schedule.from_pattern("FSSFSF")
    assert [l.kv_source for l in s.layers] == [None, 0, 0, None, 3, None]
    assert [l.role for l in s.layers] == ["full", "sparse", "sparse", "full", "sparse", "full"]


def test_hybrid_puts_full_layers_every_ratio_plus_one_and_last():
    s = Schedule.hybrid(49, 11)
    assert s.num_full == 5 and [i for i, c in enumerate(s.pattern) if c == "F"] == [0, 12, 24, 36, 48]
    s7 = Schedule.hybrid(36, 3)
    assert len(s7) == 36 and s7.pattern[0] == "F" and s7.pattern[-1] == "F" and s7.num_full == 10


def test_presets_are_the_paper_configs():
    assert set(Schedule.presets()) == {"hysparse-7b", "hysparse-80b-a3b"}
    assert Schedule.preset("hysparse-7b") == Schedule.hybrid(36, 3)
    big = Schedule.preset("hysparse-80b-a3b")
    assert (len(big), big.num_full, big.block_size, big.topk, big.window) == (49, 5, 64, 1024, 128)
    with pytest.raises(ValueError, match="hysparse-7b"):
        Schedule.preset("hysparse-7")


def test_defaults_follow_the_paper():
    s = Schedule.from_pattern("FS")
    assert (s.block_size, s.topk, s.window, s.kv_sharing, s.swa, s.sinks, s.gate, s.mode) == \
        (64, 1024, 128, "sparse_branch", True, True, "element", "paper")
    assert s.layers[1].nsel == 16 and not s.layers[1].merge


def test_training_free_resolves_to_own_kv_without_gates_or_sinks():
    s = Schedule.from_pattern("FSS", mode="training_free")
    layer = s.layers[1]
    assert (layer.kv_sharing, layer.sinks, layer.gate, layer.merge, layer.window) == ("none", False, "none", True, 128)


@pytest.mark.parametrize("option", [{"sinks": True}, {"gate": "element"}, {"kv_sharing": "sparse_branch"}])
def test_training_free_refuses_contradicting_options(option):
    name = next(iter(option))
    with pytest.raises(ValueError, match=f"{name}.*training_free"):
        Schedule.from_pattern("FS", mode="training_free", **option)


def test_overrides_apply_per_layer():
    s = Schedule.from_pattern("FSSFS", overrides={2: {"window": 256, "gate": "head"}, 3: {"topk": 512}})
    assert s.layers[2].window == 256 and s.layers[2].gate == "head" and s.layers[1].window == 128
    assert s.layers[3].topk == 512 and s.layers[4].topk == 512 and s.layers[1].topk == 1024
    assert Schedule.from_pattern("FS", overrides={1: {"swa": False}}).layers[1].window is None


@pytest.mark.parametrize("kwargs, field, value", [
    (dict(pattern="FXS"), "letter", "'X'"),
    (dict(pattern=""), "pattern", "empty"),
    (dict(pattern="SFF"), "sparse layer", "layer 0"),
    (dict(pattern="FS", topk=100), "topk", "100"),
    (dict(pattern="FS", topk=0), "topk", "0"),
    (dict(pattern="FS", block_size=48), "block_size", "48"),
    (dict(pattern="FS", block_size=8), "block_size", "8"),
    (dict(pattern="FS", window=0), "window", "0"),
    (dict(pattern="FS", window=-3), "window", "-3"),
    (dict(pattern="FS", kv_sharing="all"), "kv_sharing", "'all'"),
    (dict(pattern="FS", gate="channel"), "gate", "'channel'"),
    (dict(pattern="FS", mode="fast"), "mode", "'fast'"),
    (dict(pattern="FS", overrides={0: {"window": 64}}), "window", "full layer"),
    (dict(pattern="FS", overrides={1: {"topk": 64}}), "topk", "sparse layer"),
    (dict(pattern="FS", overrides={5: {"window": 64}}), "layer 5", "out of range"),
    (dict(pattern="FS", overrides={1: {"window": 0}}), "window", "0"),
])
def test_bad_values_name_the_field_and_value(kwargs, field, value):
    with pytest.raises((ValueError, TypeError)) as e:
        Schedule(**kwargs)
    assert field in str(e.value) and value in str(e.value)


def test_bool_is_not_an_int():
    with pytest.raises(TypeError, match="window"):
        Schedule.from_pattern("FS", window=True)


def test_unknown_option_suggests_the_right_name():
    with pytest.raises(TypeError, match="did you mean 'window'"):
        Schedule.from_pattern("FS", windw=64)


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".toml", ".json"])
def test_files_round_trip(tmp_path, suffix):
    s = Schedule.hybrid(12, 3, topk=512, window=64, overrides={2: {"window": 32}, 4: {"topk": 256}})
    path = s.dump(tmp_path / f"s{suffix}")
    assert Schedule.load(path) == s
    t = Schedule.from_pattern("FSS", mode="training_free")
    assert Schedule.load(t.dump(tmp_path / f"t{suffix}")) == t


def test_file_with_a_typo_in_a_key_names_it(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("pattern: FSSS\nwindw: 64\n")
    with pytest.raises(ValueError, match=r"unknown key 'windw'.*did you mean 'window'"):
        Schedule.load(p)


def test_yaml_is_loaded_safely(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("pattern: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        Schedule.load(p)


def test_unknown_file_type_is_refused(tmp_path):
    with pytest.raises(ValueError, match=".ini"):
        Schedule.load(tmp_path / "s.ini")


def test_schedule_is_frozen():
    s = Schedule.from_pattern("FS")
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.window = 3
    assert s.replace(window=3).window == 3
