"""Bad input to compile(): a specific error naming the field / value / valid options, and the model untouched."""
import pytest
import torch

import hysparse_compile as hs
from models import MLPOnly, WINDOW, build, chunked_softmax, hf_refused, nano_gpt, softmax_gqa


def _schedule(pattern="FS"):
    return hs.Schedule.from_pattern(pattern, block_size=16, topk=32, window=WINDOW)


def _fails(model, schedule, match, exc=ValueError, **kwargs):
    """compile must raise `exc` matching `match`, leaving the model's outputs, weights and modules as they were."""
    ids = torch.randint(0, 100, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids)
    before = before if isinstance(before, torch.Tensor) else before.logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [n for n, _ in model.named_modules()]
    flags = [m.training for m in model.modules()]
    with pytest.raises(exc, match=match) as info:
        hs.compile(model, schedule, **kwargs)
    with torch.no_grad():
        after = model(ids)
    after = after if isinstance(after, torch.Tensor) else after.logits
    assert torch.equal(before, after)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert [n for n, _ in model.named_modules()] == modules and [m.training for m in model.modules()] == flags
    return str(info.value)


def test_pattern_longer_than_attention_layers_names_both_numbers():
    msg = _fails(nano_gpt(layers=2), _schedule("FSS"), "'FSS' has 3 layers but the model has 2 attention layers")
    assert "h.0.attn" in msg and "h.1.attn" in msg


def test_model_without_attention_lists_what_was_seen():
    msg = _fails(MLPOnly(), _schedule("F"), "no attention the compiler recognizes")
    assert "linear" in msg


def test_bidirectional_softmax_attention_is_rejected_as_non_causal():
    msg = _fails(softmax_gqa(layers=2, mask="none"), _schedule(), "is not causal")
    assert "query 0 sees key 1" in msg


def test_chunked_mask_is_rejected_with_what_the_query_sees():
    # sliding-window masks are recognized (tests/families); a chunked mask is neither causal nor a window: the last
    # query sees the 8 keys of its chunk (a window of 8 is measured), but query 8 starts a chunk and sees only itself
    msg = _fails(chunked_softmax(layers=2), _schedule(), r"is not causal within a sliding window of \d+ keys")
    assert "layer 0 (h.0.attn)" in msg and "chunked" in msg


def test_position_bias_in_the_logits_is_rejected():
    _fails(softmax_gqa(layers=2, mask="alibi"), _schedule(), "not scale \\* q.k plus a 0/-inf mask")


def test_multi_head_latent_attention_is_refused_naming_the_layer_and_head_dims():
    msg = _fails(hf_refused("deepseek_v3"), _schedule(), "multi-head latent attention")
    assert "layer 0 (model.layers.0.self_attn)" in msg and "query/key heads of dim 32 and value heads of dim 16" in msg


def test_alibi_added_to_the_logits_is_refused_as_alibi_naming_the_layer():
    msg = _fails(hf_refused("mpt"), _schedule(), "ALiBi: a per-head bias linear in the query-key distance")
    assert "layer 0 (transformer.blocks.0.attn)" in msg and "slopes 0.25, 0.0625" in msg and "take no additive bias" in msg


def test_bloom_alibi_through_baddbmm_is_refused_naming_each_layer():
    msg = _fails(hf_refused("bloom"), _schedule(), "no attention the compiler recognizes")
    assert "softmax at transformer.h.0.self_attention (the logits are baddbmm(bias, q, k^T)" in msg
    assert "Bloom's ALiBi" in msg and "transformer.h.1.self_attention" in msg


def test_non_causal_sdpa_is_rejected():
    model = nano_gpt(layers=2)
    for block in model.h:  # swap in a bidirectional attention call
        block.attn.forward = _bidirectional(block.attn)
    _fails(model, _schedule(), "is not causal")


def _bidirectional(attn):
    def forward(x):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, attn.heads, C // attn.heads).transpose(1, 2) for t in attn.c_attn(x).split(C, 2))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return attn.c_proj(y.transpose(1, 2).reshape(B, T, C))
    return forward


def test_backend_that_cannot_use_the_device_names_one_that_can(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    msg = _fails(nano_gpt(layers=2), _schedule(), "backend='triton' cannot run full_attention", backend="triton")
    assert "reference" in msg and "cpu" in msg


def test_head_dim_a_backend_cannot_run_names_one_that_can(monkeypatch):
    from hysparse_compile.kernels import flex

    monkeypatch.setattr(flex, "supports", lambda op, **meta: f"head dim {meta['head_dim']} is not supported")
    msg = _fails(softmax_gqa(layers=2), _schedule(), "head dim 16 is not supported", backend="flex")
    assert "backends that can: reference" in msg and "Hq=4, Hkv=2, d=16" in msg


def test_unknown_backend_lists_the_valid_ones():
    _fails(nano_gpt(layers=2), _schedule(), "backend must be one of 'reference', 'flex', 'triton', 'auto'",
           backend="cuda")


@pytest.mark.parametrize("bad, match", [
    (torch.randint(0, 100, (20,)), r"shape \[batch, seq_len\], got torch.int64 of shape \(20,\)"),
    (torch.randn(2, 20), "must be an integer tensor"),
    (torch.randint(0, 100, (2, 1)), "at least 2 tokens"),
    (torch.randint(0, 100, (2, 500)), "has 500 tokens but the model has 128 positions"),
    ({"input_ids": torch.randint(0, 100, (2, 8)), "attention_mask": torch.ones(2, 9)}, "'attention_mask' must have"),
    ({"tokens": torch.randint(0, 100, (2, 8))}, "unknown input"),
])
def test_example_inputs_of_the_wrong_shape_are_rejected(bad, match):
    _fails(build("llama-sdpa"), _schedule(), match, example_inputs=bad)


def test_unknown_option_is_rejected():
    _fails(nano_gpt(layers=2), _schedule(), "unknown compile option", exc=TypeError, gate_scale=1.0)


def test_save_branches_must_be_a_bool():
    _fails(nano_gpt(layers=2), _schedule(), "save_branches must be True or False, got 'yes'", exc=TypeError,
           save_branches="yes")


def test_schedule_must_be_a_schedule():
    _fails(nano_gpt(layers=2), "FS", "schedule must be a hysparse_compile.Schedule", exc=TypeError)


def test_labels_on_a_model_without_loss_are_refused():
    from models import compiled_pair

    _, compiled = compiled_pair("nano")
    ids = torch.randint(0, 100, (2, 10))
    with pytest.raises(TypeError, match="computes no loss"):
        compiled(ids, labels=ids)
