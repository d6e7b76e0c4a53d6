"""capture: example inputs from the config, dynamic batch and sequence axes, the model restored."""
import torch

import hysparse_compile as hs
from hysparse_compile.passes import CompileState, capture
from models import build


def test_example_inputs_are_made_from_the_config():
    inputs, generated = capture.example_inputs_for(build("gpt2-sdpa"), None)
    ids = inputs["input_ids"]
    assert generated and ids.shape == (2, 32) and int(ids.max()) < 128


def test_batch_of_one_is_widened_so_the_batch_axis_stays_dynamic():
    model = build("nano")
    call, dims = capture._graph_inputs(model, {"input_ids": torch.randint(0, 100, (1, 9))})
    assert call["input_ids"].shape == (2, 9) and set(dims["input_ids"]) == {0, 1}


def test_capture_keeps_batch_and_sequence_symbolic_and_restores_training_flags():
    model = build("llama-sdpa").train()
    state = capture.run(CompileState(model=model, schedule=hs.Schedule.from_pattern("FS")))
    ids = next(n for n in state.gm.graph.nodes if n.op == "placeholder")
    assert all(isinstance(s, torch.SymInt) for s in ids.meta["val"].shape)
    assert list(state.call_inputs) == ["input_ids", "attention_mask", "position_ids", "use_cache"]
    assert all(m.training for m in model.modules())
