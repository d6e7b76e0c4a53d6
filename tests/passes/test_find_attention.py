"""find_attention: sites in layer order, un-repeated K/V, the model's own scale, the gate input."""
import math

import hysparse_compile as hs
from hysparse_compile.passes import CompileState, capture, find_attention
from models import compiled_pair, softmax_gqa


def _sites(name):
    return compiled_pair(name)[1]._hysparse_state.sites


def test_gqa_sites_record_kv_before_the_repeat():
    for name in ("llama-sdpa", "llama-eager", "softmax"):
        for site in _sites(name):
            assert (site.heads, site.kv_heads, site.head_dim) == (4, 2, 16), name
            assert tuple(site.k.meta["val"].shape)[1] == 2


def test_sites_are_in_layer_order_with_their_modules():
    assert [s.module for s in _sites("qwen2-eager")] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert [s.layer for s in _sites("gpt2-sdpa")] == ["transformer.h.0", "transformer.h.1"]


def test_gate_input_is_the_hidden_state_feeding_the_query_projection():
    for name in ("llama-sdpa", "gpt2-eager", "nano"):  # separate q_proj, fused Conv1D c_attn, fused Linear
        for site in _sites(name):
            shape = tuple(site.gate_input.meta["val"].shape)
            assert len(shape) == 3 and shape[2] == 64 and site.hidden == 64, name


def test_custom_scale_of_an_explicit_softmax_model_is_kept():
    model = softmax_gqa(layers=2, scale=0.37)
    state = capture.run(CompileState(model=model, schedule=hs.Schedule.from_pattern("FS")))
    sites = find_attention.find_sites(state.gm)
    assert [s.kind for s in sites] == ["softmax", "softmax"]
    assert all(math.isclose(s.scale, 0.37, rel_tol=1e-6) for s in sites)


def test_hf_models_honour_padding_and_plain_models_take_no_mask():
    assert compiled_pair("mistral-sdpa")[1]._hysparse_state.padding
    assert not compiled_pair("nano")[1]._hysparse_state.padding
