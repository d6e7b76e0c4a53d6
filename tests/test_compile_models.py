"""compile() on every supported family: exactness in training-free mode, padding, training, signature, export."""
import pytest
import torch

import hysparse_compile as hs
from models import MODEL_NAMES, WINDOW, build, compiled_pair, logits

HF_NAMES = [n for n in MODEL_NAMES if "-" in n]


def _ids(B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 100, (B, T), generator=g)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_training_free_with_topk_covering_all_blocks_reproduces_original_logits(name):
    model, compiled = compiled_pair(name)
    for T in (40, 21):  # the graph was captured at T=32: other lengths run through the same module
        ids = _ids(2, T, seed=T)
        with torch.no_grad():
            ref, out = logits(model(ids)), logits(compiled(ids))
        assert out.shape == ref.shape
        assert _rel(out, ref) < 1e-5, f"{name} T={T}: relative error {_rel(out, ref):.2e}"


@pytest.mark.parametrize("name", ["llama-sdpa", "qwen2-eager", "gpt2-sdpa", "mistral-eager"])
def test_left_padded_batch_rows_equal_unpadded_single_rows(name):
    _, compiled = compiled_pair(name)
    ids, pads = _ids(3, 37, seed=1), [0, 5, 19]
    mask = torch.ones_like(ids)
    for row, p in enumerate(pads):
        mask[row, :p] = 0
    kwargs = {}
    if name.startswith("gpt2"):  # absolute positions: the caller numbers real tokens from 0, as generate() does
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        batch = logits(compiled(ids, attention_mask=mask, **kwargs))
        for row, p in enumerate(pads):
            single = logits(compiled(ids[row:row + 1, p:]))
            assert _rel(batch[row, p:], single[0]) < 1e-5, f"row {row} (pad {p})"


def test_paper_mode_padding_matches_unpadded_rows():
    _, compiled = compiled_pair("llama-sdpa", mode="paper")
    ids = _ids(2, 35, seed=2)
    mask = torch.ones_like(ids)
    mask[1, :11] = 0
    with torch.no_grad():
        batch = logits(compiled(ids, attention_mask=mask.bool()))  # a bool mask works like the int64 one
        single = logits(compiled(ids[1:, 11:]))
    assert _rel(batch[1, 11:], single[0]) < 1e-5


def test_mask_with_holes_is_rejected():
    _, compiled = compiled_pair("llama-sdpa")
    ids = _ids(2, 20)
    mask = torch.ones_like(ids)
    mask[1, 7] = 0
    with pytest.raises(ValueError, match="row 1 has holes"):
        compiled(ids, attention_mask=mask)


def test_paper_mode_registers_zero_initialized_gates_and_sinks_in_state_dict():
    model, compiled = compiled_pair("llama-sdpa", mode="paper")
    new = {k: v for k, v in compiled.state_dict().items() if "hysparse" in k}
    Hq, d, hidden = 4, 16, 64
    assert set(new) == {"model.layers.1.hysparse.gate.weight", "model.layers.1.hysparse.sinks"}
    assert new["model.layers.1.hysparse.gate.weight"].shape == (2 * Hq * d, hidden)  # element gates, 2 branches
    assert new["model.layers.1.hysparse.sinks"].shape == (Hq,)
    assert all(bool((v == 0).all()) for v in new.values())
    names = {n for n, _ in compiled.named_parameters()}
    assert set(new) <= names
    assert set(model.state_dict()) <= set(compiled.state_dict())  # original keys kept as they were


def test_training_free_adds_no_parameters():
    model, compiled = compiled_pair("qwen2-sdpa")
    assert set(compiled.state_dict()) == set(model.state_dict())


def test_weights_are_shared_not_copied():
    model, compiled = compiled_pair("llama-sdpa", mode="paper")
    mine = dict(compiled.named_parameters())
    for name, p in model.named_parameters():
        assert mine[name] is p, name


def test_backward_reaches_original_and_new_weights(train_mode):
    model, compiled = compiled_pair("llama-sdpa", mode="paper")
    train_mode(compiled)  # a shared model: the fixture restores eval mode even if the test fails
    ids = _ids(2, 33, seed=3)
    out = compiled(input_ids=ids, labels=ids)
    assert out.loss is not None and out.loss.ndim == 0
    compiled.zero_grad()
    out.loss.backward()
    params = dict(compiled.named_parameters())
    for name in ("model.layers.1.hysparse.gate.weight", "model.layers.1.hysparse.sinks",
                 "model.layers.0.self_attn.k_proj.weight", "model.layers.1.self_attn.q_proj.weight",
                 "model.embed_tokens.weight"):
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name
    compiled.zero_grad()


def test_labels_give_the_original_loss_in_training_free_mode():
    model, compiled = compiled_pair("mistral-sdpa")
    ids = _ids(2, 30, seed=4)
    with torch.no_grad():
        ref, out = model(ids, labels=ids), compiled(ids, labels=ids)
    assert type(out) is type(ref)
    assert abs(out.loss.item() - ref.loss.item()) < 1e-5 * abs(ref.loss.item())


def test_plain_model_returns_a_plain_tensor():
    model, compiled = compiled_pair("nano")
    out = compiled(_ids(2, 18))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 18, 128)


def test_use_cache_false_returns_no_cache_and_true_returns_a_hysparse_cache():
    from hysparse_compile.runtime import HySparseCache

    _, compiled = compiled_pair("gpt2-eager")
    ids = _ids(2, 12)
    out = compiled(ids, use_cache=False)
    assert logits(out).shape == (2, 12, 128)
    out = compiled(ids, use_cache=True)
    cache = out.get("cache", out.get("past_key_values"))
    assert isinstance(cache, HySparseCache) and cache.get_seq_length() == 12


def test_train_and_eval_switch_modes(train_mode):
    _, compiled = compiled_pair("gpt2-sdpa")
    train_mode(compiled)  # a shared model: the fixture restores eval mode even if the test fails
    assert compiled.training and all(m.training for m in compiled.modules())
    compiled.eval()
    assert not compiled.training and not any(m.training for m in compiled.modules())


def test_original_model_outputs_are_bit_identical_after_compile():
    model = build("llama-eager")
    ids = _ids(2, 24, seed=5)
    with torch.no_grad():
        before = model(ids).logits.clone()
    keys = list(model.state_dict())
    modules = [n for n, _ in model.named_modules()]
    hs.compile(model, hs.Schedule.from_pattern("FS", block_size=16, topk=32, window=WINDOW))
    with torch.no_grad():
        after = model(ids).logits
    assert torch.equal(before, after)
    assert list(model.state_dict()) == keys and [n for n, _ in model.named_modules()] == modules


def test_sharing_ablations_draw_the_documented_edges_and_gates():
    overrides = {2: {"kv_sharing": "none"}, 3: {"kv_sharing": "both", "swa": False, "gate": "head"}}
    model = build("nano", layers=4)
    schedule = hs.Schedule.from_pattern("FSSS", block_size=16, topk=32, window=WINDOW, overrides=overrides)
    compiled = hs.compile(model, schedule, sink_init=-1.0, gate_init=lambda w: torch.nn.init.constant_(w, 0.01))
    report = hs.inspect(compiled)
    assert set(report.edges) == {(0, 1, "kv"), (0, 1, "indices"), (0, 2, "indices"), (0, 3, "kv"),
                                 (0, 3, "indices")}
    sd = compiled.state_dict()
    assert sd["h.1.hysparse.gate.weight"].shape == (2 * 4 * 16, 64)  # element gates, SWA + sparse
    assert sd["h.3.hysparse.gate.weight"].shape == (1 * 4, 64)  # head gate, swa=False: one branch
    assert torch.equal(sd["h.3.hysparse.sinks"], torch.full((4,), -1.0))
    assert torch.equal(sd["h.1.hysparse.gate.weight"], torch.full((128, 64), 0.01))  # gate_init initializer
    out = compiled(_ids(2, 40))
    assert torch.isfinite(out).all()


def test_torch_export_of_the_compiled_module_keeps_one_node_per_hysparse_op_and_dynamic_shapes():
    from torch.export import Dim

    _, compiled = compiled_pair("llama-sdpa", mode="paper")
    ids = _ids(2, 24, seed=6)
    dims = {"input_ids": {0: Dim.AUTO, 1: Dim.AUTO}, "attention_mask": {0: Dim.AUTO, 1: Dim.AUTO}}
    ep = torch.export.export(compiled, (), {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                             dynamic_shapes=dims, strict=False)  # keyed by the original forward's input names
    ops = [str(n.target) for n in ep.graph.nodes if "hysparse" in str(n.target) and n.op == "call_function"]
    assert ops == ["hysparse.full_attention.default", "hysparse.sparse_attention.default"]
    ids = _ids(3, 37, seed=10)  # another batch and length, left padding included
    mask = torch.ones_like(ids)
    mask[2, :6] = 0
    with torch.no_grad():
        assert torch.allclose(ep.module()(input_ids=ids, attention_mask=mask).logits,
                              compiled(ids, attention_mask=mask).logits, atol=1e-6)


def test_torch_compile_of_the_compiled_module_runs():
    _, compiled = compiled_pair("nano", mode="paper")
    ids = _ids(2, 24, seed=7)
    fast = torch.compile(compiled, backend="aot_eager", dynamic=True)
    with torch.no_grad():
        assert torch.allclose(fast(ids), compiled(ids), atol=1e-6)


def test_paper_mode_with_half_gates_and_whole_windows_reproduces_the_original_on_padded_rows():
    # kv_sharing="none", window and topk >= T, no sinks: both branches are full causal attention over the layer's
    # own K/V, so the zero-initialized gates (0.5 each) must give back the original layer exactly.
    model = build("llama-eager")
    schedule = hs.Schedule.from_pattern("FS", block_size=16, topk=48, window=48, kv_sharing="none", sinks=False)
    compiled = hs.compile(model, schedule)
    ids = _ids(2, 40, seed=8)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    with torch.no_grad():
        out = compiled(ids, attention_mask=mask).logits
        ref0, ref1 = model(ids[:1]).logits, model(ids[1:, 9:]).logits
    assert _rel(out[0], ref0[0]) < 1e-5 and _rel(out[1, 9:], ref1[0]) < 1e-5


def test_sdpa_with_enable_gqa_keeps_kv_heads_and_is_exact():
    from models import nano_gpt

    model = nano_gpt(layers=2, kv_heads=2)
    compiled = hs.compile(model, hs.Schedule.from_pattern("FS", block_size=16, topk=48, window=16,
                                                          mode="training_free"))
    assert [s.kv_heads for s in compiled._hysparse_state.sites] == [2, 2]
    ids = _ids(2, 40, seed=9)
    with torch.no_grad():
        assert _rel(compiled(ids), model(ids)) < 1e-5

