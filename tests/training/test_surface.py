"""What training tools read from a model: a compiled HF model is a `PreTrainedModel` with the original's parameter
counts, embedding modules (holding the original's tensors) and loss keyword arguments; what would replace modules
behind the graph's back raises, saying what to do."""
import copy

import pytest
import torch
import torch.nn as nn

import models

transformers = pytest.importorskip("transformers")


def _new_parameters(compiled) -> int:
    return sum(p.numel() for n, p in compiled.named_parameters() if ".hysparse." in n)


def test_compiled_hf_model_is_a_pretrained_model_with_the_original_counts():
    model, compiled = models.compiled_pair("llama-sdpa", mode="paper")
    assert isinstance(compiled, transformers.PreTrainedModel) and compiled.supports_gradient_checkpointing
    assert _new_parameters(compiled) > 0
    assert compiled.num_parameters() == model.num_parameters() + _new_parameters(compiled)
    assert compiled.num_parameters(exclude_embeddings=True) == (model.num_parameters(exclude_embeddings=True)
                                                               + _new_parameters(compiled))
    frozen = copy.deepcopy(compiled)
    for name, p in frozen.named_parameters():
        p.requires_grad_(".hysparse." in name)
    assert frozen.num_parameters(only_trainable=True) == _new_parameters(compiled)


@pytest.mark.parametrize("name", ["llama-sdpa", "gpt2-eager", "nano"])
def test_embedding_accessors_return_the_modules_holding_the_original_weights(name):
    model, compiled = models.compiled_pair(name)
    inp, out = compiled.get_input_embeddings(), compiled.get_output_embeddings()
    assert isinstance(inp, nn.Embedding) and isinstance(out, nn.Linear)
    if name == "nano":
        assert inp.weight is model.wte.weight and out.weight is model.lm_head.weight
    else:
        assert inp.weight is model.get_input_embeddings().weight
        assert out.weight is model.get_output_embeddings().weight


def test_loss_keyword_arguments_reach_the_loss_as_in_the_original(gen):
    model, compiled = models.compiled_pair("llama-sdpa")  # training-free, exact: losses compare tightly
    ids = torch.randint(0, models.VOCAB, (2, 40), generator=gen)
    labels = ids.clone()
    labels[:, :10] = -100
    cases = [(labels, {}), (labels, {"num_items_in_batch": 7}), (labels, {"num_items_in_batch": torch.tensor(7)}),
             (ids, {"ignore_index": int(ids[0, 5])})]
    with torch.no_grad():
        for target, kwargs in cases:
            ours = compiled(ids, labels=target, **kwargs).loss
            theirs = model(ids, labels=target, **kwargs).loss
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6, msg=lambda m: f"{kwargs}: {m}")
        summed = compiled(ids, labels=labels, num_items_in_batch=1).loss
        mean = compiled(ids, labels=labels).loss
        torch.testing.assert_close(summed / (labels[:, 1:] != -100).sum(), mean)  # sum / number of labelled tokens
    assert compiled.accepts_loss_kwargs


def test_module_replacing_methods_raise_with_what_to_do():
    _, compiled = models.compiled_pair("llama-sdpa")
    with pytest.raises(NotImplementedError, match=r"resize the original model's embeddings first.*then hs.compile"):
        compiled.resize_token_embeddings(256)
    with pytest.raises(NotImplementedError, match="set it on the original model, then hs.compile it"):
        compiled.set_input_embeddings(nn.Embedding(4, 4))
    with pytest.raises(RuntimeError, match="re-initialize"):
        compiled.init_weights()


def test_save_pretrained_takes_what_trainer_passes(tmp_path):
    _, compiled = models.compiled_pair("llama-sdpa")
    compiled.save_pretrained(tmp_path / "given", state_dict=compiled.state_dict(), is_main_process=True)
    assert (tmp_path / "given" / "model.safetensors").is_file()
    compiled.save_pretrained(tmp_path / "not-main", is_main_process=False)  # Trainer's non-writer ranks
    assert not (tmp_path / "not-main").exists()
    with pytest.raises(ValueError, match="safetensors only"):
        compiled.save_pretrained(tmp_path, safe_serialization=False)
    with pytest.raises(ValueError, match=r"state_dict does not have the compiled model's keys \(missing \['lm_head"):
        compiled.save_pretrained(tmp_path, state_dict={k: v for k, v in compiled.state_dict().items()
                                                       if not k.startswith("lm_head")})
