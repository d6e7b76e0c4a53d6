"""Schedule.from_model: a Hybrid-SWA original's global layers stay full, its sliding layers become sparse layers
whose SWA branch is the original window (window-only `W` before the first global layer); training-free with topk 0
reproduces the original, with topk > 0 it adds the selected blocks (docs/compiler.md, "Hybrid-SWA models")."""
import logging

import pytest
import torch
from family_setup import BLOCK, cached_logits, ids, names, original, rel, training_free

import hysparse_compile as hs
from models import hf_family, hf_model, logits, softmax_gqa


# ---------------------------------------------------------------------------------------------- the mapping
@pytest.mark.parametrize("name, pattern", [("gemma2", "WFSF"), ("gemma3", "WWFS"), ("gpt_oss", "WFSF"),
                                           ("mistral-window", "FSSS")])
def test_global_layers_stay_full_and_sliding_layers_keep_their_window(name, pattern):
    s = hs.Schedule.from_model(original(name), block_size=BLOCK, topk=32)
    assert s.pattern == pattern
    for spec, letter in zip(s.layers, pattern):
        if letter == "F":
            assert spec.role == "full" and spec.topk == 32
        else:
            assert spec.role == "sparse" and spec.window == 8
            assert (spec.kv_source is None) == (letter == "W")
            assert spec.kv_source is None or pattern[spec.kv_source] == "F" and spec.kv_source < spec.index
    window_only = [spec for spec, letter in zip(s.layers, pattern) if letter == "W"]
    assert all((w.topk, w.nsel, w.gate, w.sinks, w.merge) == (0, 0, "none", False, False) for w in window_only)


def test_window_option_replaces_the_sparse_layers_window_and_window_only_layers_keep_theirs(tmp_path):
    s = hs.Schedule.from_model(original("gemma3"), block_size=BLOCK, window=32, overrides={3: {"gate": "head"}})
    assert [spec.window for spec in s.layers] == [8, 8, None, 32]
    assert s.layers[3].gate == "head"
    assert hs.Schedule.load(s.dump(tmp_path / "s.yaml")) == s  # W layers and their windows round-trip


def test_every_layer_sliding_makes_layer_0_full_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="hysparse_compile.hybrid_swa"):
        s = hs.Schedule.from_model(original("mistral-window"), block_size=BLOCK, topk=32)
    assert s.pattern == "FSSS" and [spec.window for spec in s.layers] == [None, 8, 8, 8]
    assert "layer 0 becomes a full layer (it attends to the whole prefix" in caplog.text


def test_a_model_without_sliding_layers_is_refused_with_what_to_use_instead():
    with pytest.raises(ValueError, match=r"LlamaForCausalLM has no sliding-window layers.*Schedule.hybrid\(2, ratio\)"):
        hs.Schedule.from_model(hf_model("llama", layers=2))


def test_windows_of_a_model_without_config_are_measured_on_its_graph():
    model = softmax_gqa(layers=2, mask="window")  # a plain module whose masks keep the last 4 keys
    s = hs.Schedule.from_model(model, block_size=BLOCK, topk=32, mode="training_free")
    assert s.pattern == "FS" and s.layers[1].window == 4


def test_select_nothing_is_valid_only_in_training_free_mode():
    with pytest.raises(ValueError, match=r"topk=0 selects no blocks, which is valid only with mode='training_free'"):
        hs.Schedule.from_pattern("FS", topk=0)
    with pytest.raises(ValueError, match=r"overrides\[0\] \(full layer\).topk=0 selects no blocks"):
        hs.Schedule.from_pattern("FS", overrides={0: {"topk": 0}})
    assert hs.Schedule.from_pattern("FS", topk=0, mode="training_free").layers[1].nsel == 0
    with pytest.raises(ValueError, match=r"layer 1 is 'S'.*make the leading layers window-only, 'W'"):
        hs.Schedule.from_pattern("WSF")
    with pytest.raises(ValueError, match=r"field 'gate' cannot be overridden on a window-only layer"):
        hs.Schedule.from_pattern("WF", overrides={0: {"gate": "head"}})


# ---------------------------------------------------------------------------------------------- exactness
def _layer0_global_reference(model, tokens):
    """The original Mistral with layer 0 attending to the whole prefix (what from_model makes of it), through a
    registered HF attention function: layer 0 causal SDPA without the window, the others unchanged."""
    import transformers as tf
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    def attention(module, q, k, v, mask, **kwargs):
        if module.layer_idx == 0:
            kwargs.pop("is_causal", None)
            return sdpa_attention_forward(module, q, k, v, None, is_causal=True, **kwargs)
        return sdpa_attention_forward(module, q, k, v, mask, **kwargs)

    tf.AttentionInterface.register("hysparse_test_layer0_global", attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register("hysparse_test_layer0_global", sdpa_mask)
    model.config._attn_implementation = "hysparse_test_layer0_global"
    try:
        with torch.no_grad():
            return logits(model(tokens))
    finally:
        model.config._attn_implementation = "sdpa"


@pytest.mark.parametrize("name", names("falcon"))  # Falcon has no sliding layers to keep
def test_training_free_with_topk_0_reproduces_the_original(name):
    model, compiled = training_free(name)
    tokens = ids(2, 40, seed=6)  # 5 windows, 3 blocks
    with torch.no_grad():
        out = logits(compiled(tokens))
        want = (_layer0_global_reference(model, tokens) if name == "mistral-window" else logits(model(tokens)))
        plain = logits(model(tokens))
    assert rel(out, want) < 1e-5, f"{name}: relative error {rel(out, want):.2e}"
    if name == "mistral-window":  # the promoted layer 0 is what differs from the original, and only beyond 8 tokens
        assert rel(out, plain) > 1e-2 and rel(out[:, :8], plain[:, :8]) < 1e-5
    assert rel(cached_logits(compiled, tokens), out) < 1e-4


def test_training_free_with_topk_0_is_exact_on_left_padded_rows():
    model, compiled = training_free("gemma3")
    tokens = ids(2, 37, seed=7)
    mask = torch.ones_like(tokens)
    mask[1, :9] = 0
    with torch.no_grad():
        out = logits(compiled(tokens, attention_mask=mask))
        assert rel(out[0], logits(model(tokens[:1]))[0]) < 1e-5
        assert rel(out[1, 9:], logits(model(tokens[1:, 9:]))[0]) < 1e-5


def test_training_free_with_every_block_selected_is_the_model_without_windows():
    # topk >= T: each sparse layer's softmax covers its window and every selected block, i.e. the whole prefix
    _, compiled = training_free("mistral-window", topk=48)
    unwindowed = hf_family("mistral-window", "sdpa")
    unwindowed.config.sliding_window = None  # same weights, every layer global
    tokens = ids(2, 40, seed=8)
    with torch.no_grad():
        out, want = logits(compiled(tokens)), logits(unwindowed(tokens))
        windowed = logits(original("mistral-window")(tokens))
    assert rel(out, want) < 1e-5 and rel(out, windowed) > 1e-2


@pytest.mark.full_grid
def test_training_free_with_some_blocks_selected_adds_them_to_the_window():
    model, compiled = training_free("gemma3", topk=BLOCK)  # one block per token on top of the 8-token window
    tokens = ids(2, 40, seed=9)
    with torch.no_grad():
        out, plain = logits(compiled(tokens)), logits(model(tokens))
    assert rel(out[:, :8], plain[:, :8]) < 1e-5  # inside the first window nothing changes
    assert rel(out, plain) > 1e-3  # later tokens also see their selected block
    assert rel(cached_logits(compiled, tokens), out) < 1e-4
