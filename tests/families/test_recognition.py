"""find_attention and the probe on the new families: soft-capped logits, a query pre-scale, the model's own sinks,
sliding windows (measured, or from the config when longer than the probe) and Falcon's fused QKV gate input are
recognized and recorded on each site; MoE routers are left alone."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from family_setup import original
from family_setup import sites as family_sites

import hysparse_compile as hs
from hysparse_compile.passes import CompileState, capture, find_attention
from models import HIDDEN, TinyDecoder, hf_family


def _sites(model):
    state = capture.run(CompileState(model=model, schedule=hs.Schedule.from_pattern("F")))
    return find_attention.run(state).sites


def test_gemma2_soft_capped_logits_and_query_pre_attn_scalar_are_recorded():
    sites = family_sites("gemma2")
    assert [s.softcap for s in sites] == [4.0] * 4
    assert all(math.isclose(s.scale, 24 ** -0.5, rel_tol=1e-6) for s in sites)  # query_pre_attn_scalar=24, not d=16


def test_sliding_windows_are_measured_on_sliding_layers_only():
    for name in ("gemma2", "gemma3", "mistral-window"):
        sites = family_sites(name)
        types = getattr(original(name).config, "layer_types", None) or ["sliding_attention"] * 4
        assert [s.window for s in sites] == [8 if t == "sliding_attention" else None for t in types], name
        assert {s.window_source for s in sites if s.window} == {"probe"}


def test_gpt_oss_sinks_are_the_attention_modules_own_parameters_and_moe_routers_are_not_sites():
    sites = family_sites("gpt_oss")
    assert [s.sinks_name for s in sites] == [f"model.layers.{i}.self_attn.sinks" for i in range(4)]
    assert [s.module for s in sites] == [f"model.layers.{i}.self_attn" for i in range(4)]  # no mlp.router softmax
    assert [s.window for s in sites] == [8, None, 8, None] and all(s.softcap is None for s in sites)


def test_falcon_gate_reads_the_hidden_state_feeding_the_fused_qkv_projection():
    sites = family_sites("falcon")
    assert [(s.heads, s.kv_heads, s.head_dim, s.hidden) for s in sites] == [(4, 2, 16, HIDDEN)] * 4
    assert all(s.gate_input.target is torch.ops.aten.layer_norm.default for s in sites)  # ln_attn's output


def test_a_window_longer_than_the_probe_comes_from_the_config():
    model = hf_family("gemma3", "sdpa", layers=3)
    model.config.sliding_window = 64  # the probe batch has 32 tokens: every mask looks causal
    for layer in model.model.layers:
        layer.self_attn.sliding_window = 64
    sites = _sites(model)
    assert [(s.window, s.window_source) for s in sites] == [(64, "config"), (64, "config"), (None, None)]


class _PreScaled(nn.Module):
    """q is multiplied by c before q @ k^T, which carries no scale of its own (Gemma's original query pre-scale)."""

    def __init__(self, c: float):
        super().__init__()
        self.c, self.qkv, self.out = c, nn.Linear(HIDDEN, 3 * HIDDEN), nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, 4, C // 4).transpose(1, 2) for t in self.qkv(x).split(C, 2))
        att = ((q * self.c) @ k.transpose(-2, -1)).masked_fill(
            torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
        return self.out((F.softmax(att, -1) @ v).transpose(1, 2).reshape(B, T, C))


def test_a_query_pre_scale_folds_into_the_scale():
    torch.manual_seed(0)
    sites = _sites(TinyDecoder(lambda: _PreScaled(0.3), layers=2).eval())
    assert all(math.isclose(s.scale, 0.3, rel_tol=1e-6) for s in sites)
