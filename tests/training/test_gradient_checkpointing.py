"""Gradient checkpointing of compiled models (hysparse_compile/checkpointing.py): each decoder layer's region of the
graph runs under torch.utils.checkpoint, so the forward keeps far fewer activations for the backward, and the loss
and every gradient are those of the plain graph.

Activation memory is measured as the bytes of the distinct tensors autograd saves for the backward during the
forward (a `saved_tensors_hooks` pack hook; parameters excluded): with checkpointing that is what enters each layer
(the checkpoint saves its inputs through the same hooks) plus what the graph saves outside the layers."""
import copy

import pytest
import torch
from training_setup import compiled_llama

import models

T = 64


def _inputs(name, gen):
    ids = torch.randint(0, models.VOCAB, (2, T), generator=gen)
    if name == "nano":
        return ids, {}
    mask = torch.ones_like(ids)
    mask[1, :9] = 0  # a left-padded row: the padding flag must be the same in the recomputation
    return ids, {"attention_mask": mask}


def _loss(compiled, name, ids, kwargs):
    if name == "nano":
        logits = compiled(ids)
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    return compiled(ids, labels=ids, **kwargs).loss


def _step(compiled, name, ids, kwargs):
    """(loss, gradients by name, activation bytes saved during the forward)."""
    compiled.zero_grad(set_to_none=True)
    params = {p.untyped_storage().data_ptr() for p in compiled.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = _loss(compiled, name, ids, kwargs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in compiled.named_parameters() if p.grad is not None}
    return loss.detach(), grads, sum(saved.values())


@pytest.mark.parametrize("name", ["llama-sdpa", "nano"])  # GPT-2 (padding, dropout): the last test
def test_checkpointing_keeps_loss_and_gradients_and_saves_fewer_activations(name, gen):
    compiled = copy.deepcopy(models.compiled_pair(name, mode="paper")[1]).train()
    ids, kwargs = _inputs(name, gen)
    loss, grads, plain_bytes = _step(compiled, name, ids, kwargs)
    compiled.gradient_checkpointing_enable()
    assert compiled.is_gradient_checkpointing
    gc_loss, gc_grads, gc_bytes = _step(compiled, name, ids, kwargs)
    assert len(compiled._checkpointed.regions) == 2  # one region per decoder layer
    torch.testing.assert_close(gc_loss, loss, rtol=1e-6, atol=1e-8)
    assert gc_grads.keys() == grads.keys() and any(".hysparse." in n for n in grads)
    for key, grad in grads.items():
        torch.testing.assert_close(gc_grads[key], grad, rtol=1e-6, atol=1e-8, msg=lambda m: f"{key}: {m}")
    # measured (2 layers, B=2, T=64): llama 1.61 MB -> 0.28 MB, nano 1.00 -> 0.30; equal bitwise
    assert gc_bytes < 0.4 * plain_bytes, (gc_bytes, plain_bytes)


def test_checkpointing_applies_only_to_training_forwards_and_switches_off(gen):
    compiled = copy.deepcopy(models.compiled_pair("llama-sdpa", mode="paper")[1])
    ids, kwargs = _inputs("llama-sdpa", gen)
    compiled.gradient_checkpointing_enable()
    with torch.no_grad():
        plain = compiled.eval()(ids, **kwargs).logits
    compiled.train()
    with torch.no_grad():
        compiled(ids, **kwargs)
    assert compiled._checkpointed is None  # eval and no_grad run the model's own graph
    torch.testing.assert_close(compiled(ids, **kwargs).logits, plain, rtol=0, atol=0)
    assert compiled._checkpointed is not None
    _, _, gc_bytes = _step(compiled, "llama-sdpa", ids, kwargs)
    compiled.gradient_checkpointing_disable()
    assert not compiled.is_gradient_checkpointing and compiled._checkpointed is None
    _, _, plain_bytes = _step(compiled, "llama-sdpa", ids, kwargs)
    assert gc_bytes < 0.4 * plain_bytes


def test_every_n_layers_checkpoints_every_nth_decoder_layer(gen):
    compiled = compiled_llama("FSSS")
    ids, kwargs = _inputs("llama-sdpa", gen)
    loss, grads, plain_bytes = _step(compiled, "llama-sdpa", ids, kwargs)
    compiled.gradient_checkpointing_enable(every_n_layers=2)
    half_loss, half_grads, half_bytes = _step(compiled, "llama-sdpa", ids, kwargs)
    assert compiled._checkpointed.regions == ["model.layers.0", "model.layers.2"]
    torch.testing.assert_close(half_loss, loss, rtol=1e-6, atol=1e-8)
    for key, grad in grads.items():
        torch.testing.assert_close(half_grads[key], grad, rtol=1e-6, atol=1e-8, msg=lambda m: f"{key}: {m}")
    compiled.gradient_checkpointing_enable()
    _, _, all_bytes = _step(compiled, "llama-sdpa", ids, kwargs)
    assert all_bytes < half_bytes < plain_bytes


def test_bad_checkpointing_settings_are_refused_with_the_reason():
    compiled = copy.deepcopy(models.compiled_pair("llama-sdpa", mode="paper")[1])
    with pytest.raises(ValueError, match="use_reentrant=True is not supported.*use_reentrant=False"):
        compiled.gradient_checkpointing_enable({"use_reentrant": True})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['reentrant'\].*'use_reentrant'"):
        compiled.gradient_checkpointing_enable({"reentrant": False})
    with pytest.raises(ValueError, match="every_n_layers must be a positive integer, got 0"):
        compiled.gradient_checkpointing_enable(every_n_layers=0)
    assert not compiled.is_gradient_checkpointing


def test_checkpointing_replays_dropout_and_padding_of_the_forward(gen):
    """GPT-2 with dropout in every layer and a left-padded row: the recomputation draws the forward's masks and takes
    the padded path again."""
    import transformers as tf

    import hysparse_compile as hs

    torch.manual_seed(0)
    config = tf.GPT2Config(vocab_size=models.VOCAB, n_embd=models.HIDDEN, n_layer=2, n_head=4,
                           n_positions=models.MAX_POS, resid_pdrop=0.2, embd_pdrop=0.2, attn_pdrop=0.0)
    compiled = hs.compile(tf.GPT2LMHeadModel(config).eval(), hs.Schedule.from_pattern(
        "FS", block_size=16, topk=32, window=16)).train()  # dropout inside every layer region
    ids, kwargs = _inputs("gpt2-eager", gen)

    def seeded_step():
        torch.manual_seed(123)
        return _step(compiled, "gpt2-eager", ids, kwargs)

    loss, grads, plain_bytes = seeded_step()
    assert not torch.equal(_step(compiled, "gpt2-eager", ids, kwargs)[0], loss)  # other masks: dropout is on
    compiled.gradient_checkpointing_enable()
    gc_loss, gc_grads, gc_bytes = seeded_step()
    torch.testing.assert_close(gc_loss, loss, rtol=1e-6, atol=1e-8)
    assert gc_grads.keys() == grads.keys() and any(".hysparse." in n for n in grads)
    for key, grad in grads.items():
        torch.testing.assert_close(gc_grads[key], grad, rtol=1e-6, atol=1e-8, msg=lambda m: f"{key}: {m}")
    assert gc_bytes < 0.4 * plain_bytes, (gc_bytes, plain_bytes)  # measured 2.52 MB -> 0.30 MB
