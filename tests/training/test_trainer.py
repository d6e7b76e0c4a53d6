"""`transformers.Trainer` on a compiled model: it trains (the new gates too), writes checkpoints that
`hs.from_pretrained` (= `type(compiled).from_pretrained`) loads, resumes from them with the same continuing losses,
and takes `TrainingArguments(gradient_checkpointing=True)`."""
import json
import warnings

import pytest
import torch
from training_setup import TokenDataset, compiled_llama

transformers = pytest.importorskip("transformers")

STEPS = 4


def _args(out, **kwargs):
    return transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=4, max_steps=STEPS, save_steps=2, logging_steps=1,
        learning_rate=3e-3, report_to=[], use_cpu=True, disable_tqdm=True, seed=0, **kwargs)


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _train(out, resume=None, **kwargs):
    compiled = compiled_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' own deprecation notices
        trainer = transformers.Trainer(model=compiled, args=_args(out, **kwargs), train_dataset=TokenDataset())
        trainer.train(resume_from_checkpoint=resume)
    return compiled, _losses(trainer)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One 4-step Trainer run from the compiled model, checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("trainer")
    compiled, losses = _train(out)
    return compiled, losses, out


def test_trainer_trains_the_compiled_model_and_its_gates(run):
    compiled, losses, _ = run
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses)))
    before = compiled_llama()
    moved = [n for n, p in compiled.named_parameters() if not torch.equal(p, before.get_parameter(n))]
    assert any(".hysparse.gate." in n for n in moved) and any(".hysparse.sinks" in n for n in moved)
    assert any("q_proj" in n for n in moved)


def test_trainer_checkpoints_load_with_from_pretrained(run, gen):
    compiled, _, out = run
    ckpt = out / f"checkpoint-{STEPS}"
    assert {"hysparse.json", "schedule.json", "config.json", "model.safetensors"} <= {p.name for p in ckpt.iterdir()}
    aliases = json.loads((ckpt / "hysparse.json").read_text())["aliases"]
    assert aliases == {"lm_head.weight": "model.embed_tokens.weight"}  # tied: written once (safetensors refuses)
    loaded = type(compiled).from_pretrained(ckpt)  # the class method of a PreTrainedModel is hs.from_pretrained
    assert type(loaded).__name__ == "HySparseLlamaForCausalLM" and loaded is not compiled
    ids = torch.randint(0, 128, (2, 40), generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(ids).logits, compiled.eval()(ids).logits, rtol=0, atol=0)


def test_trainer_resumes_from_a_checkpoint_with_the_same_losses(run, tmp_path):
    compiled, losses, out = run
    resumed, resumed_losses = _train(tmp_path, resume=str(out / "checkpoint-2"))
    # the log history of steps 1-2 comes from the checkpoint; steps 3-4 are trained again from its weights,
    # optimizer, scheduler and RNG state
    torch.testing.assert_close(torch.tensor(resumed_losses), torch.tensor(losses), rtol=1e-6, atol=1e-6)
    for name, p in resumed.named_parameters():
        torch.testing.assert_close(p, compiled.get_parameter(name), rtol=1e-6, atol=1e-7, msg=name)
    assert resumed.get_output_embeddings().weight is resumed.get_input_embeddings().weight  # still tied


def test_trainer_gradient_checkpointing_argument_checkpoints_each_layer(run, tmp_path):
    _, losses, _ = run
    compiled, checkpointed_losses = _train(tmp_path, gradient_checkpointing=True)
    assert compiled.is_gradient_checkpointing
    assert compiled._checkpointed.regions == [f"model.layers.{i}" for i in range(4)]
    torch.testing.assert_close(torch.tensor(checkpointed_losses), torch.tensor(losses), rtol=1e-6, atol=1e-6)
