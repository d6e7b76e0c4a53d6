"""PEFT LoRA and compiled models (hysparse_compile/adapters.py), in both orders.

LoRA then compile: the adapters trace into the graph and train there (with the new gates), base weights stay
frozen, `compiled.save_pretrained` / `hs.from_pretrained` keep them and PEFT's own adapter save of the PEFT model
writes the trained values (the parameters are shared). Compile then LoRA: PEFT takes the compiled model's
`nn.Linear` holders as targets and the graph calls the LoRA layers; a target the graph cannot call raises."""
import json
import warnings

import pytest
import torch
from training_setup import SCHEDULE, TokenDataset, compiled_llama, token_rows

import models

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import hysparse_compile as hs  # noqa: E402


def _lora():
    return peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, task_type="CAUSAL_LM")


def _set_lora_b(model, scale):
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def lora_then_compile():
    peft_model = peft.get_peft_model(models.hf_model("llama", "sdpa", layers=2), _lora())
    compiled = hs.compile(peft_model, hs.Schedule.from_pattern("FS", **SCHEDULE), gate_init=0.01, sink_init=0.1)
    return peft_model, compiled


def test_lora_then_compile_captures_the_adapters_in_the_graph(lora_then_compile):
    _, compiled = lora_then_compile
    assert type(compiled).__name__ == "HySparseLlamaForCausalLM"  # named after the model inside the PEFT model
    ids = token_rows(2)
    _set_lora_b(compiled, 0.0)
    base = _logits(compiled, ids)
    _set_lora_b(compiled, 0.2)
    assert (_logits(compiled, ids) - base).abs().max() > 1e-2  # the graph computes the LoRA branch
    _set_lora_b(compiled, 0.0)


def test_lora_then_compile_trains_adapters_and_gates_with_trainer_and_checkpointing(lora_then_compile, tmp_path):
    peft_model, compiled = lora_then_compile
    before = {n: p.detach().clone() for n, p in compiled.named_parameters()}
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2,
                                          learning_rate=1e-2, report_to=[], use_cpu=True, disable_tqdm=True,
                                          save_strategy="no", gradient_checkpointing=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        transformers.Trainer(model=compiled, args=args, train_dataset=TokenDataset()).train()
    assert compiled.is_gradient_checkpointing
    moved = {n for n, p in compiled.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {n for n, p in compiled.named_parameters() if p.requires_grad}  # every trainable one moved
    assert any("lora_A" in n for n in moved) and any("lora_B" in n for n in moved)
    assert any(".hysparse.gate." in n for n in moved)  # the gates are new parameters PEFT did not freeze
    assert not any("base_layer" in n or "mlp" in n or "embed" in n for n in moved)  # frozen as PEFT set them

    peft_model.save_pretrained(tmp_path / "adapter")  # PEFT's adapter save of the model given to compile
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    lora = {n.replace(".default", ""): p for n, p in compiled.named_parameters() if "lora_" in n}
    assert saved.keys() == lora.keys()
    for name, value in saved.items():
        torch.testing.assert_close(value, lora[name].detach(), rtol=0, atol=0)
        assert not torch.equal(value, before[name.replace(".weight", ".default.weight")])


def test_lora_then_compile_checkpoint_round_trip(lora_then_compile, tmp_path):
    _, compiled = lora_then_compile
    _set_lora_b(compiled, 0.2)
    compiled.save_pretrained(tmp_path)
    record = json.loads((tmp_path / "hysparse.json").read_text())["peft"]
    assert record["order"] == "before_compile" and sorted(record["configs"]["default"]["target_modules"]) == [
        "q_proj", "v_proj"]
    loaded = hs.from_pretrained(tmp_path)
    assert loaded.state_dict().keys() == compiled.state_dict().keys()
    ids = token_rows(2)
    torch.testing.assert_close(_logits(loaded, ids), _logits(compiled, ids), rtol=0, atol=0)
    _set_lora_b(compiled, 0.0)


def test_compile_then_lora_runs_the_lora_layers_in_the_graph(tmp_path):
    compiled = compiled_llama()
    ids = token_rows(2)
    base = _logits(compiled, ids)
    peft_model = peft.get_peft_model(compiled, _lora())
    assert torch.equal(_logits(peft_model, ids), base)  # LoRA starts as the identity (lora_B = 0)
    called = [n.target for n in compiled._graph_module.graph.nodes if n.op == "call_module" and "proj" in n.target]
    assert called == [f"model.layers.{i}.self_attn.{p}_proj" for i in range(4) for p in "qv"]
    _set_lora_b(peft_model, 0.2)
    adapted = _logits(peft_model, ids)
    assert (adapted - base).abs().max() > 1e-2
    with peft_model.disable_adapter():  # PEFT's own switches work: its layers run in the graph
        assert torch.equal(_logits(peft_model, ids), base)

    peft_model.train()

    def grads():
        peft_model.zero_grad(set_to_none=True)
        peft_model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.grad is not None}

    plain = grads()
    assert plain and all("lora_" in n for n in plain)  # PEFT froze everything else, the gates included
    compiled.gradient_checkpointing_enable()
    checkpointed = grads()
    for key, grad in plain.items():
        torch.testing.assert_close(checkpointed[key], grad, rtol=1e-6, atol=1e-8, msg=lambda m: f"{key}: {m}")

    compiled.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "hysparse.json").read_text())["peft"]["order"] == "after_compile"
    loaded = hs.from_pretrained(tmp_path)
    torch.testing.assert_close(_logits(loaded, ids), adapted, rtol=0, atol=0)


def test_compile_then_lora_on_a_module_the_graph_cannot_call_says_what_to_do():
    compiled = compiled_llama()
    peft_model = peft.get_peft_model(compiled, peft.LoraConfig(target_modules=["embed_tokens"], r=4))
    # tied embeddings: the graph names the weight `lm_head.weight`; replacing `model.embed_tokens` is still seen
    with pytest.raises(RuntimeError, match=r"model.embed_tokens .*Apply the adapter to the original model, then "
                                           r"compile it: hs.compile\(get_peft_model\(model, config\), schedule\)"):
        peft_model(input_ids=token_rows(2))


def test_compile_then_lora_computes_what_peft_on_the_original_computes():
    import copy

    model, compiled = models.compiled_pair("llama-sdpa")  # training-free, every block selected: exact in fp32
    eager = peft.get_peft_model(copy.deepcopy(model), _lora())
    ours = peft.get_peft_model(copy.deepcopy(compiled), _lora())
    _set_lora_b(eager, 0.2)
    ours.load_state_dict(eager.state_dict())  # same adapter weights by name
    ids = token_rows(2)
    torch.testing.assert_close(_logits(ours, ids), _logits(eager, ids), rtol=0, atol=1e-5)  # measured 1.5e-7
