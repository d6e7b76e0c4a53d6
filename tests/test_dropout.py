"""Dropout in the compiled module: the graph is captured in eval mode, where each dropout is a no-op node that keeps
the model's p; capture turns those into `nn.Dropout` submodules, so `.train()` applies them and `.eval()` does not.
Dropout on attention probabilities has no counterpart in the HySparse ops: it is named in a warning."""
import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hysparse_compile as hs
import models

T = 40


def _gpt2(attn: str, attn_pdrop: float):
    import transformers as tf

    torch.manual_seed(0)
    config = tf.GPT2Config(vocab_size=models.VOCAB, n_embd=models.HIDDEN, n_layer=2, n_head=4,
                           n_positions=models.MAX_POS, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=attn_pdrop)
    config._attn_implementation = attn
    model = tf.GPT2LMHeadModel(config)
    model.config._attn_implementation = attn
    return model.eval()


def _exact_schedule():  # training-free, every block selected: the compiled model computes what the original does
    return hs.Schedule.from_pattern("FS", block_size=models.BLOCK, topk=models.TOPK, window=models.WINDOW,
                                    mode="training_free")


def test_dropout_follows_train_and_eval_as_in_the_original(gen):
    model = _gpt2("sdpa", attn_pdrop=0.0)
    compiled = hs.compile(model, _exact_schedule())
    dropouts = {n: m.p for n, m in compiled.named_modules() if isinstance(m, nn.Dropout)}
    assert dropouts == {n: 0.1 for n in ("transformer.drop", "transformer.h.0.attn.resid_dropout",
                                         "transformer.h.0.mlp.dropout", "transformer.h.1.attn.resid_dropout",
                                         "transformer.h.1.mlp.dropout")}
    assert compiled.state_dict().keys() == model.state_dict().keys()  # dropout adds no state
    ids = torch.randint(0, models.VOCAB, (2, T), generator=gen)

    model.train(), compiled.train()
    assert all(m.training for m in compiled.modules())
    torch.manual_seed(5)
    ref = model(ids).logits
    torch.manual_seed(5)
    out = compiled(ids).logits  # the same dropout masks, drawn in the same order
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert (compiled(ids).logits - compiled(ids).logits).abs().max() > 1e-2  # a new mask per call
    out.sum().backward()
    assert model.transformer.wte.weight.grad is not None

    model.eval(), compiled.eval()
    torch.testing.assert_close(compiled(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled(ids).logits, compiled(ids).logits, rtol=0, atol=0)


class _Dropped(nn.Module):
    """Embedding, one attention block (nanoGPT) with a functional dropout on its output, then nn.Dropout(0.3); returns
    the hidden states so the dropped entries can be counted."""

    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(models.VOCAB, models.HIDDEN)
        self.attn = models._NanoAttention(models.HIDDEN, 4)
        self.drop = nn.Dropout(0.3)

    def forward(self, input_ids):
        x = self.wte(input_ids)
        x = x + F.dropout(self.attn(x), 0.2, self.training)
        return self.drop(x)


def test_dropout_rate_matches_the_original(gen):
    torch.manual_seed(0)
    model = _Dropped().eval()
    compiled = hs.compile(model, hs.Schedule.from_pattern("F", block_size=models.BLOCK, topk=models.TOPK))
    dropouts = {n: m.p for n, m in compiled.named_modules() if isinstance(m, nn.Dropout)}
    assert dropouts == {"dropout": 0.2, "drop": 0.3}  # F.dropout (called by the root) gets a module of its own
    ids = torch.randint(0, models.VOCAB, (8, T), generator=gen)
    clean = compiled(ids)
    compiled.train()
    with torch.no_grad():
        out = compiled(ids)
    zero = out == 0
    assert abs(zero.float().mean().item() - 0.3) < 0.02, zero.float().mean()  # 20480 entries: 5 sigma = 0.016
    compiled.drop.eval()  # only the inner dropout (p=0.2) left: kept entries of the residual move, none vanish
    with torch.no_grad():
        inner = compiled(ids)
    assert not (inner == 0).any() and (inner - clean).abs().max() > 1e-3
    compiled.eval()
    compiled.drop.train()  # only the outer dropout: kept entries are the eval values scaled by 1 / (1 - p)
    with torch.no_grad():
        outer = compiled(ids)
    kept = outer != 0
    torch.testing.assert_close(outer[kept], clean[kept] / 0.7, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_attention_dropout_is_named_in_a_warning(attn, gen, caplog):
    model = _gpt2(attn, attn_pdrop=0.1)
    with caplog.at_level(logging.WARNING, logger="hysparse_compile.passes.capture"):
        compiled = hs.compile(model, _exact_schedule())
    text = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert "transformer.h.0.attn.attn_dropout (p=0.1)" in text and "config.attn_pdrop=0.1" in text, text
    assert "other dropout (5 site(s)) is applied in .train()" in text, text
    ids = torch.randint(0, models.VOCAB, (2, T), generator=gen)
    torch.testing.assert_close(compiled(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)  # eval: exact
