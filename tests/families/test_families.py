"""Gemma 2, Gemma 3 (text), Mistral (sliding window), gpt-oss and Falcon (new decoder architecture) in paper mode:
they compile, train (the loss reaches the original weights and the new gates), generate (cached decoding equals a
full re-run) and export to standard ONNX. Tiny random configs (tests/models.py `hf_family`), head dim 16."""
import pytest
import torch
from family_setup import CASES, cached_logits, ids, paper, rel

from models import logits

# one parameter of the original per family that the loss must reach: a sparse layer's query projection (or fused
# QKV) and, for gpt-oss, the model's own sinks on a full and on a sparse layer (they serve as the HySparse sinks)
ORIGINAL_WEIGHTS = {
    "gemma2": ["model.layers.2.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"],
    "gemma3": ["model.layers.3.self_attn.q_proj.weight", "model.layers.2.self_attn.k_proj.weight"],
    "mistral-window": ["model.layers.1.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"],
    "gpt_oss": ["model.layers.2.self_attn.q_proj.weight", "model.layers.1.self_attn.sinks",
                "model.layers.2.self_attn.sinks", "model.layers.0.self_attn.sinks"],
    "falcon": ["transformer.h.1.self_attention.query_key_value.weight", "transformer.h.0.self_attention.dense.weight"],
}


@pytest.mark.parametrize("name", CASES)
def test_paper_mode_loss_backward_reaches_original_weights_and_gates(name, train_mode):
    _, compiled = paper(name)
    train_mode(compiled)
    tokens = ids(2, 40, seed=1)
    compiled.zero_grad()
    compiled(input_ids=tokens, labels=tokens).loss.backward()
    params = dict(compiled.named_parameters())
    gates = [n for n in params if n.endswith("hysparse.gate.weight")]
    assert gates, "paper mode adds gates to every sparse layer"
    for n in gates + ORIGINAL_WEIGHTS[name]:
        assert params[n].grad is not None and params[n].grad.abs().sum() > 0, n
    compiled.zero_grad()


@pytest.mark.parametrize("name", CASES)
def test_paper_mode_cached_decoding_equals_a_full_rerun(name):
    _, compiled = paper(name)
    tokens = ids(2, 40, seed=2)
    with torch.no_grad():
        full = logits(compiled(tokens))
    assert rel(cached_logits(compiled, tokens), full) < 1e-4


def test_gpt_oss_sparse_layers_use_the_original_sinks_and_add_none():
    model, compiled = paper("gpt_oss")
    new = {k for k in compiled.state_dict() if ".hysparse." in k}
    assert new == {"model.layers.2.hysparse.gate.weight"}  # W layer 0: nothing; S layer 2: gates, not sinks
    assert set(model.state_dict()) <= set(compiled.state_dict())


ONNX_DEFAULT = ("gemma2",)  # soft-capped logits through the decomposition; the other families under --full


@pytest.mark.parametrize("name", [pytest.param(n, marks=[] if n in ONNX_DEFAULT else [pytest.mark.full_grid])
                                  for n in CASES])
def test_standard_onnx_export_runs_in_onnxruntime_like_the_compiled_model(name, tmp_path):
    pytest.importorskip("onnxruntime")
    from hysparse_compile.export import onnx_standard, to_onnx

    _, compiled = paper(name)
    example = ids(2, 24, seed=3)
    to_onnx(compiled, {"input_ids": example, "attention_mask": torch.ones_like(example)}, tmp_path / "m.onnx")
    tokens = ids(1, 45, seed=4)  # another batch and length than the export's
    feed = {"input_ids": tokens, "attention_mask": torch.ones_like(tokens)}
    if "position_ids" in compiled._captured:
        feed["position_ids"] = torch.arange(45).expand(1, 45)
    with torch.no_grad():
        want = logits(compiled(**feed))
    assert rel(onnx_standard.run_onnxruntime(tmp_path / "m.onnx", feed), want) < 1e-4
