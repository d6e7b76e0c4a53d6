"""Checkpoints and moves of compiled models: `.to(dtype / device)` after compile, deepcopy, pickle,
`save_pretrained` / `hs.from_pretrained`, and compiling a compiled model."""
import copy
import functools
import io
import json
import pickle

import pytest
import torch
import torch.nn as nn
from models import BLOCK, TOPK, WINDOW, TinyDecoder, _NanoAttention, compiled_pair, logits, nano_gpt

import hysparse_compile as hs
from hysparse_compile.graph import portable

T = 40


def _ids(gen, batch=2, T=T):
    return torch.randint(0, 128, (batch, T), generator=gen)


def _rel(a, b) -> float:
    a, b = a.detach().float(), b.detach().float()
    return ((a - b).abs().max() / b.abs().max()).item()


def _out(module, ids, **kwargs):
    with torch.no_grad():
        return logits(module(ids, **kwargs))


@functools.lru_cache(maxsize=None)
def _llama_bf16():
    """The shared training-free Llama, deep-copied and cast to bfloat16 after compile (tests only read it)."""
    return copy.deepcopy(compiled_pair("llama-sdpa")[1]).to(torch.bfloat16)


@functools.lru_cache(maxsize=None)
def _gpt2_half():
    """The shared training-free GPT-2, deep-copied and cast to float16 after compile (tests only read it)."""
    return copy.deepcopy(compiled_pair("gpt2-eager")[1]).half()


def _paper(name):
    """A paper-mode compiled model copy whose gates and sinks are not at their initial values."""
    compiled = copy.deepcopy(compiled_pair(name, mode="paper")[1])
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for key, p in compiled.named_parameters():
            if ".hysparse." in key:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return compiled


# ------------------------------------------------------------------------------------------------ dtype moves
def test_bf16_after_compile_matches_fp32_compiled_and_original_cast(gen):
    model, compiled = compiled_pair("llama-sdpa")
    ids = _ids(gen)
    out = _out(_llama_bf16(), ids)
    assert out.dtype == torch.bfloat16
    original_bf16 = _out(copy.deepcopy(model).to(torch.bfloat16), ids)
    assert _rel(out, _out(compiled, ids)) < 3e-2  # measured 6e-3 (the original's own bf16 error is 6.5e-3)
    assert _rel(out, original_bf16) < 3e-2  # measured 6e-3


def test_cast_after_compile_equals_compiling_the_cast_model(gen):
    model, compiled = compiled_pair("llama-sdpa")
    direct = hs.compile(copy.deepcopy(model).to(torch.bfloat16), compiled.schedule)
    ids = _ids(gen)
    assert torch.equal(_out(_llama_bf16(), ids), _out(direct, ids))  # same graph: RMSNorm upcast, residual in bf16


def test_rmsnorm_upcast_stays_float32_after_bf16_cast():
    graph = _llama_bf16()._graph_module.graph
    pows = [n for n in graph.nodes if n.target == torch.ops.aten.pow.Tensor_Scalar]
    assert len(pows) == 5  # 2 layers x 2 norms + the final norm
    for node in pows:  # variance = x.to(float32).pow(2).mean(...)
        cast = node.args[0]
        assert cast.target == torch.ops.aten.to.dtype and cast.args[1] == torch.float32
    follow = [n for n in graph.nodes if n.target == torch.ops.aten.to.dtype and n.args[1] == torch.bfloat16]
    assert len(follow) >= 5  # `.to(input_dtype)` after each norm, cos / sin `.to(x.dtype)`


def test_half_then_float_restores_the_fp32_graph(gen):
    _, compiled = compiled_pair("gpt2-eager")
    ids = _ids(gen)
    out = _out(_gpt2_half(), ids)
    assert out.dtype == torch.float16
    assert _rel(out, _out(compiled, ids)) < 5e-3  # measured 5e-4
    back = copy.deepcopy(_gpt2_half()).float()
    reference = copy.deepcopy(compiled)
    reference.load_state_dict(back.state_dict())  # the same fp16-rounded weights in the untouched fp32 graph
    out32 = _out(back, ids)
    assert out32.dtype == torch.float32
    assert torch.equal(out32, _out(reference, ids))


def test_bfloat16_method_on_nanogpt_matches_the_original_cast(gen):
    model, compiled = compiled_pair("nano")
    ids = _ids(gen)
    out = _out(copy.deepcopy(compiled).bfloat16(), ids)
    assert out.dtype == torch.bfloat16
    assert _rel(out, _out(copy.deepcopy(model).bfloat16(), ids)) < 3e-2  # measured 3e-3
    assert _rel(out, _out(compiled, ids)) < 3e-2  # measured 5e-3


class _HalfOnlyClamp(TinyDecoder):
    """Code that takes another path in float16: a graph captured in float32 cannot stand for it."""

    def forward(self, input_ids):
        x = super().forward(input_ids)
        if self.lm_head.weight.dtype == torch.float16:
            x = x.clamp(-6e4, 6e4)
        return x


def test_dtype_dependent_code_refuses_the_move_before_anything_moves(gen):
    torch.manual_seed(0)
    model = _HalfOnlyClamp(lambda: _NanoAttention(64, 4), layers=2).eval()
    compiled = hs.compile(model, hs.Schedule.from_pattern("FS", block_size=BLOCK, topk=TOPK, window=WINDOW))
    ids = _ids(gen)
    before = _out(compiled, ids)
    with pytest.raises(RuntimeError, match=r"another path at torch.float16.*compile a copy of the model cast"):
        compiled.half()
    assert all(p.dtype == torch.float32 for p in compiled.parameters())
    assert torch.equal(_out(compiled, ids), before)


# ------------------------------------------------------------------------------------------------ device moves
@pytest.mark.parametrize("name", ["nano", "llama-sdpa", "qwen2-sdpa"])
def test_device_constants_follow_the_module(name, gen):
    _, compiled = compiled_pair(name)
    graph = compiled._graph_module.graph
    assert not [n for n in graph.nodes if n.target == torch.ops.aten._assert_tensor_metadata.default]
    assert portable.pinned(compiled._graph_module) == []  # every device constant is marked as "the module's"
    moved = copy.deepcopy(compiled).to("meta")
    devices = [v for n in moved._graph_module.graph.nodes for v in portable.node_leaves(n).values()
               if isinstance(v, torch.device)]
    assert devices and all(d.type == "meta" for d in devices)
    ids = _ids(gen).to("meta")
    call = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "position_ids": torch.arange(T, device="meta").expand(2, T), "use_cache": False}
    out = logits(moved._graph_module(**{k: v for k, v in call.items() if k in compiled._captured}))
    assert out.device.type == "meta" and tuple(out.shape) == (2, T, 128)
    assert all(d.type == "cpu" for n in graph.nodes for d in portable.node_leaves(n).values()
               if isinstance(d, torch.device))  # the original is untouched


def test_real_move_drops_derived_runtime_graphs():
    compiled = copy.deepcopy(compiled_pair("nano")[1])
    object.__setattr__(compiled, "_checkpointed", "derived")
    compiled.float()  # already float32 on the CPU: nothing to re-derive
    assert compiled._checkpointed == "derived"
    compiled.to("meta")
    assert compiled._checkpointed is None


# ------------------------------------------------------------------------------------------------ copies
def test_deepcopy_is_independent(gen):
    _, compiled = compiled_pair("llama-sdpa", mode="paper")
    twin = copy.deepcopy(compiled)
    ids = _ids(gen)
    assert torch.equal(_out(twin, ids), _out(compiled, ids))
    ptrs = {p.data_ptr() for p in compiled.parameters()}
    assert not ptrs & {p.data_ptr() for p in twin.parameters()}
    assert all(site.q.graph is twin._graph_module.graph for site in twin._hysparse_state.sites)
    assert hs.inspect(twin).roles == ("full", "sparse")
    snapshot = {k: v.clone() for k, v in compiled.state_dict().items()}
    opt = torch.optim.SGD(twin.parameters(), lr=0.5)
    twin(ids, labels=ids).loss.backward()
    opt.step()
    assert all(torch.equal(v, compiled.state_dict()[k]) for k, v in snapshot.items())
    assert not torch.equal(twin.state_dict()["model.layers.1.hysparse.gate.weight"],
                           snapshot["model.layers.1.hysparse.gate.weight"])
    assert all(p.grad is None for p in compiled.parameters())


def test_pickle_refuses_and_names_save_pretrained():
    _, compiled = compiled_pair("nano")
    for dump in (pickle.dumps, lambda m: torch.save(m, io.BytesIO())):
        with pytest.raises(TypeError, match=r"save_pretrained.*from_pretrained"):
            dump(compiled)


# ------------------------------------------------------------------------------------------------ checkpoints
@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    compiled = _paper("llama-sdpa")
    directory = compiled.save_pretrained(tmp_path_factory.mktemp("llama"))
    return compiled, directory


def test_save_pretrained_writes_config_schedule_options_and_every_weight(saved_llama):
    from safetensors.torch import load_file

    compiled, directory = saved_llama
    config = json.loads((directory / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["hidden_size"] == 64
    assert hs.Schedule.load(directory / "schedule.json") == compiled.schedule
    meta = json.loads((directory / "hysparse.json").read_text())
    assert meta["backend"] == "auto" and meta["options"] == {"gate_init": 0.0, "sink_init": 0.0,
                                                          "save_branches": False}
    assert meta["dtype"] == "float32" and meta["aliases"] == {}
    weights = load_file(directory / "model.safetensors")
    state = compiled.state_dict()
    assert set(weights) == set(state)
    assert {"model.layers.1.hysparse.gate.weight", "model.layers.1.hysparse.sinks"} <= set(weights)
    assert all(torch.equal(weights[k], v) for k, v in state.items())


def test_from_pretrained_rebuilds_an_equal_hf_model(saved_llama, gen):
    compiled, directory = saved_llama
    loaded = hs.from_pretrained(directory)
    assert type(loaded).__name__ == "HySparseLlamaForCausalLM" and loaded.schedule == compiled.schedule
    state = loaded.state_dict()
    assert set(state) == set(compiled.state_dict())
    assert all(torch.equal(state[k], v) for k, v in compiled.state_dict().items())
    ids = _ids(gen)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # a left-padded row
    assert torch.equal(_out(loaded, ids, attention_mask=mask), _out(compiled, ids, attention_mask=mask))


@pytest.fixture(scope="module")
def saved_gpt2(tmp_path_factory):
    compiled = compiled_pair("gpt2-eager")[1]
    return compiled, compiled.save_pretrained(tmp_path_factory.mktemp("gpt2"))


def test_tied_weights_are_written_once_and_stay_tied(saved_gpt2, gen):
    from safetensors.torch import load_file

    compiled, directory = saved_gpt2
    state = compiled.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["transformer.wte.weight"].data_ptr()
    written = load_file(directory / "model.safetensors")
    aliases = json.loads((directory / "hysparse.json").read_text())["aliases"]
    assert len(written) == len(state) - 1 and len(aliases) == 1
    ((alias, target),) = aliases.items()
    assert {alias, target} == {"lm_head.weight", "transformer.wte.weight"} and alias not in written
    loaded = hs.from_pretrained(directory)
    tied = loaded.state_dict()
    assert tied["lm_head.weight"].data_ptr() == tied["transformer.wte.weight"].data_ptr()
    assert all(torch.equal(tied[k], v) for k, v in state.items())
    ids = _ids(gen)
    assert torch.equal(_out(loaded, ids), _out(compiled, ids))


def test_from_pretrained_dtype_equals_the_saved_model_cast(saved_gpt2, gen):
    _, directory = saved_gpt2
    loaded = hs.from_pretrained(directory, dtype=torch.float16, device="cpu")
    assert {p.dtype for p in loaded.parameters()} == {torch.float16}
    ids = _ids(gen)
    assert torch.equal(_out(loaded, ids), _out(_gpt2_half(), ids))


def test_saved_bf16_model_reloads_in_bf16_by_default(tmp_path, gen):
    compiled = _llama_bf16()
    compiled.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "hysparse.json").read_text())["dtype"] == "bfloat16"
    loaded = hs.from_pretrained(tmp_path)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    ids = _ids(gen)
    assert torch.equal(_out(loaded, ids), _out(compiled, ids))


def test_from_pretrained_plain_module_needs_model_and_loads_its_weights(tmp_path, gen):
    compiled = _paper("nano")
    compiled.save_pretrained(tmp_path)
    assert not (tmp_path / "config.json").exists()
    with pytest.raises(ValueError, match=r"TinyDecoder.*pass model="):
        hs.from_pretrained(tmp_path)
    fresh = nano_gpt(layers=2, seed=7)  # other weights: the checkpoint's replace them
    loaded = hs.from_pretrained(tmp_path, model=fresh)
    assert torch.equal(fresh.lm_head.weight, compiled.state_dict()["lm_head.weight"])
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in compiled.state_dict().items())
    ids = _ids(gen)
    assert torch.equal(_out(loaded, ids), _out(compiled, ids))


# ------------------------------------------------------------------------------------------------ misuse
def test_compiling_a_compiled_model_is_refused():
    _, compiled = compiled_pair("nano")
    schedule = compiled.schedule
    with pytest.raises(TypeError, match=r"already a compiled HySparse model.*'FS'.*original model"):
        hs.compile(compiled, schedule)
    with pytest.raises(TypeError, match=r"already a compiled HySparse model \(at '0'"):
        hs.compile(nn.Sequential(compiled), schedule)
    with pytest.raises(TypeError, match=r"already a compiled"):
        hs.compile(compiled, "FS")  # checked before the schedule: the model is the first mistake
