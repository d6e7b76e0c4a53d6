"""Damaged, edited or incomplete checkpoints: `hs.from_pretrained` names the file and what is wrong, and says what
to do (docs/errors.md, "Checkpoints"); a deliberate `schedule=` override still loads."""
import json
import shutil

import pytest
import torch

import hysparse_compile as hs
from models import hf_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    compiled = hs.compile(hf_model("llama", layers=2), hs.Schedule.from_pattern("FS", block_size=16, topk=32,
                                                                                window=16))
    return compiled, compiled.save_pretrained(tmp_path_factory.mktemp("ckpt") / "llama")


@pytest.fixture
def copy(saved, tmp_path):
    """A fresh copy of the saved checkpoint to damage."""
    return shutil.copytree(saved[1], tmp_path / "ckpt")


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_a_truncated_weights_file_is_named(copy):
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"model.safetensors cannot be read .*truncated or not a safetensors file"):
        hs.from_pretrained(copy)


@pytest.mark.parametrize("name, words", [
    ("hysparse.json", "not a HySparse checkpoint: hysparse.json is missing"),
    ("schedule.json", "schedule.json is missing"),
    ("model.safetensors", "model.safetensors is missing"),
    ("config.json", "config.json is missing"),
])
def test_a_missing_file_is_named(copy, name, words):
    (copy / name).unlink()
    with pytest.raises(FileNotFoundError, match=words):
        hs.from_pretrained(copy)


@pytest.mark.parametrize("text, words", [
    ("{not json", "hysparse.json is not valid JSON"),
    ("[1, 2]", "must hold a JSON object"),
])
def test_a_broken_hysparse_json_is_named(copy, text, words):
    (copy / "hysparse.json").write_text(text)
    with pytest.raises(ValueError, match=words):
        hs.from_pretrained(copy)


@pytest.mark.parametrize("changes, words", [
    (dict(options={"gate_init": "x"}), r"options.gate_init must be a number \(or null\), got 'x'"),
    (dict(options={"gate_int": 0.0}), "unknown compile option 'gate_int'"),
    (dict(backend="cuda"), "backend must be one of"),
    (dict(dtype="float99"), "dtype must name a torch dtype"),
    (dict(example_shape=[0, 5]), r"example_shape must be \[batch, seq_len\]"),
    (dict(format=7), "checkpoint format 7"),
])
def test_an_edited_hysparse_json_names_the_field(copy, changes, words):
    _edit_json(copy / "hysparse.json", **changes)
    with pytest.raises(ValueError, match=words):
        hs.from_pretrained(copy)


@pytest.mark.parametrize("changes, words", [
    (dict(pattern="FF"), "pattern 'FS' -> 'FF'"),
    (dict(window=32), "window 16 -> 32"),
    (dict(gate="head"), "gate 'element' -> 'head'"),
])
def test_a_schedule_other_than_the_weights_were_saved_with_is_refused(copy, changes, words):
    _edit_json(copy / "schedule.json", **changes)
    with pytest.raises(ValueError, match=f"schedule.json differs from the schedule the weights were saved with "
                                         f".*{words}.*schedule=hs.Schedule"):
        hs.from_pretrained(copy)


def test_a_deliberate_schedule_override_loads_the_same_weights(saved, copy):
    compiled, _ = saved
    wider = compiled.schedule.replace(window=32)
    again = hs.from_pretrained(copy, schedule=wider)
    assert again.schedule == wider
    for name, value in compiled.state_dict().items():
        assert torch.equal(again.state_dict()[name], value), name


def test_a_config_that_does_not_match_the_weights_names_the_shapes(copy):
    _edit_json(copy / "config.json", hidden_size=96)
    with pytest.raises(ValueError, match=r"does not fit the model given .*shapes differ.*\(128, 64\), \(128, 96\)"):
        hs.from_pretrained(copy)


def test_a_folder_that_does_not_exist_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        hs.from_pretrained(tmp_path / "nope")
