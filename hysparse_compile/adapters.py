"""PEFT adapters (LoRA) and compiled models, in either order.

LoRA, then compile (the usual order; adapters trace into the graph):

    >>> peft_model = get_peft_model(model, LoraConfig(target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    >>> compiled = hs.compile(peft_model, schedule)   # capture sees through to the model inside (passes/capture.py)
    >>> compiled.save_pretrained("ckpt/")             # hysparse.json records the adapters; from_pretrained re-applies
    >>> peft_model.save_pretrained("adapter/")        # PEFT's adapter save: the parameters are shared, so trained

Compile, then LoRA (a converted HySparse checkpoint fine-tuned with LoRA):

    >>> compiled = hs.from_pretrained("hysparse-ckpt/")
    >>> peft_model = get_peft_model(compiled, LoraConfig(target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    >>> peft_model(input_ids=ids, labels=ids).loss.backward()   # reaches lora_A / lora_B and the gates

The second order works because (1) the graph's parameter holders get the class of the original module at their
path (`restore_module_types`: a `q_proj` is an `nn.Linear` holding the original's weight tensor, not a bare
`nn.Module`), so PEFT accepts them as targets, and (2) at each call the compiled model checks whether such a module
was replaced (`sync`); the graph's `linear(x, q_proj.weight)` for a replaced module becomes a call of the module at
that path (`call_module`), so LoRA's forward — with PEFT's adapter switching, `disable_adapter()`, merging — runs
inside the graph. Replacing a module that the graph does not use as one `linear` (an embedding, a tied `lm_head`)
raises, saying to apply the adapter before compiling.

In the first order the adapters are traced: their state at compile time (active adapter, scaling, not merged) is
part of the graph, so `disable_adapter()`, `set_adapter` or `merge_adapter()` on the PEFT model afterwards do not
change what the compiled model computes (merging would count the adapter twice): compile again instead.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.fx import GraphModule

log = logging.getLogger(__name__)
RESTORED = (nn.Linear, nn.Embedding)  # leaf classes a parameter holder takes from the original (PEFT's targets)


def restore_module_types(gm: GraphModule, model: nn.Module) -> dict[str, nn.Module]:
    """Replace each bare parameter holder of `gm` whose original module (same path in `model`) is exactly an
    `nn.Linear` or `nn.Embedding` by an instance of that class holding the same parameter objects, with the
    original's plain attributes (`in_features`, `padding_idx`, ...). Its `forward` is never called by the graph
    unless `sync` makes it so. Returns {path: new module}."""
    originals = dict(model.named_modules())
    restored = {}
    for path, holder in list(gm.named_modules()):
        orig = originals.get(path)
        if not path or type(orig) not in RESTORED or type(holder) is not nn.Module:
            continue
        own = {k for k, v in orig._parameters.items() if v is not None}
        if set(holder._parameters) != own or holder._buffers or holder._modules:
            continue
        shell = type(orig).__new__(type(orig))
        nn.Module.__init__(shell)
        for key, value in vars(orig).items():
            if key not in vars(shell):
                shell.__dict__[key] = value
        for key, value in orig._parameters.items():
            shell._parameters[key] = holder._parameters[key] if value is not None else None
        shell.training = holder.training
        parent, _, leaf = path.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, leaf, shell)
        restored[path] = shell
    return restored


@dataclass
class Watch:
    """What adapters keep on a compiled model (`compiled.adapter_watch`): the modules `sync` watches (`slots`) and
    the PEFT record of a model that was compiled as a PeftModel (None otherwise)."""

    slots: dict
    before: dict | None


def watch(compiled, model: nn.Module) -> None:
    """Start watching `compiled` (just built from `model`, the model given to compile) for replaced modules."""
    object.__setattr__(compiled, "adapter_watch", Watch(slots(compiled), record_before_compile(model)))


def slots(compiled) -> dict[str, list]:
    """What `sync` watches: {path: [owner module, attribute name, module expected there, called]} for every module
    that holds parameters (the owner is the compiled model's module holding it, so a replacement wherever PEFT makes
    it is seen; called: the graph already calls whatever module is at `path`). Every one, not only those the graph
    names: of tied weights the graph reads one name (`lm_head.weight`), and replacing the other module
    (`model.embed_tokens`) must not pass unnoticed."""
    paths = sorted(name for name, m in compiled.named_modules() if name and m._parameters)
    out = {}
    for path in paths:
        parent, _, leaf = path.rpartition(".")
        owner = compiled.get_submodule(parent) if parent else compiled
        if isinstance(owner._modules.get(leaf), nn.Module):
            out[path] = [owner, leaf, owner._modules[leaf], False]
    return out


def _uses(gm: GraphModule, path: str, has_bias: bool):
    """The `aten.linear` nodes that apply the module at `path` (weight, and bias when it has one), or None when its
    parameters are read otherwise."""
    linear = torch.ops.aten.linear.default
    nodes = []
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target in (f"{path}.weight", f"{path}.bias"):
            for user in node.users:
                if user.op != "call_function" or user.target is not linear:
                    return None
                if node.target.endswith(".bias") and (len(user.args) < 3 or user.args[2] is not node):
                    return None
                if node.target.endswith(".weight") and user.args[1] is not node:
                    return None
                if user not in nodes:
                    nodes.append(user)
    for user in nodes:
        bias = user.args[2] if len(user.args) > 2 else None
        if (bias is not None) != has_bias or (bias is not None and (bias.op != "get_attr"
                                                                    or bias.target != f"{path}.bias")):
            return None
    return nodes or None


def sync(compiled) -> None:
    """Make the graph call every module that replaced a parameter-holding one since the last call (PEFT's
    `LoraLayer`, `ModulesToSaveWrapper`, ...), or raise when the graph cannot call it. Cheap when nothing changed:
    one dict lookup per parameter-holding module."""
    record = compiled.__dict__.get("adapter_watch")
    watched = None if record is None else record.slots
    if not watched:
        return
    changed = [(path, owner._modules.get(leaf)) for path, (owner, leaf, expected, _) in watched.items()
               if owner._modules.get(leaf) is not expected]
    if changed:
        _call_replaced(compiled, changed)


def _call_replaced(compiled, changed) -> None:
    gm = compiled.graph_module
    edited = False
    for path, module in changed:
        slot = compiled.adapter_watch.slots[path]
        parent, _, leaf = path.rpartition(".")
        if not parent:  # a top-level module: the graph resolves it on the graph module, not the compiled one
            setattr(gm, leaf, module)
        if slot[3]:  # already a module call (e.g. merge_and_unload put the base layer back)
            slot[2] = module
            continue
        nodes = _uses(gm, path, slot[2].bias is not None) if type(slot[2]) is nn.Linear else None
        if nodes is None:
            raise RuntimeError(f"{path} of the compiled model ({_qualname(slot[2])}) was replaced by "
                               f"{_qualname(module)} after compile; the graph reads its parameters by name, and only "
                               f"a module it applies as one linear projection (not tied to another) can become a "
                               f"call of the new module. Apply the adapter to the original model, then compile it: "
                               f"hs.compile(get_peft_model(model, config), schedule)")
        for node in nodes:
            with gm.graph.inserting_before(node):
                call = gm.graph.call_module(path, (node.args[0],))
            call.meta.update({k: v for k, v in node.meta.items() if k in ("val", "nn_module_stack", "stack_trace")})
            node.replace_all_uses_with(call)
            gm.graph.erase_node(node)
        for node in list(gm.graph.nodes):
            if node.op == "get_attr" and node.target in (f"{path}.weight", f"{path}.bias") and not node.users:
                gm.graph.erase_node(node)
        slot[2], slot[3], edited = module, True, True
        log.info("adapters: %s is now a call of its %s in the compiled graph", path, type(module).__name__)
    if edited:
        gm.graph.lint()
        gm.recompile()


def _qualname(module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


# ---------------------------------------------------------------------------------------------- checkpoints
def peft_record(compiled) -> dict | None:
    """What `save_pretrained` writes about adapters (`hysparse.json["peft"]`): the configs of the PEFT model the
    compiled model was compiled from (order "before_compile"), or of adapters injected into the compiled model
    (order "after_compile"); None without adapters."""
    record = compiled.__dict__.get("adapter_watch")
    if record is not None and record.before is not None:
        return record.before
    configs = compiled.__dict__.get("peft_config")  # PEFT's tuner sets `model.peft_config` on the model it adapts
    if configs:
        return {"order": "after_compile", "configs": {k: _config_dict(v) for k, v in configs.items()}}
    return None


def record_before_compile(model: nn.Module) -> dict | None:
    """The record of a PEFT model given to compile (None for other models)."""
    from .passes.capture import is_peft

    if not is_peft(model):
        return None
    return {"order": "before_compile", "configs": {k: _config_dict(v) for k, v in model.peft_config.items()},
            "active": model.active_adapter}


def _config_dict(config) -> dict:
    out = config.to_dict()
    for key, value in list(out.items()):
        if isinstance(value, set):
            out[key] = sorted(value)
    return out


def _configs(record: dict) -> dict:
    from peft import PeftConfig

    return {name: PeftConfig.from_peft_type(**cfg) for name, cfg in record["configs"].items()}


def apply(model: nn.Module, record: dict) -> nn.Module:
    """Re-create the adapters of `record` on `model` (the original before compile, or the compiled model after), as
    `from_pretrained` does; the adapter weights come from the checkpoint afterwards. Returns the model to use."""
    from peft import get_peft_model, inject_adapter_in_model

    configs = _configs(record)
    if record["order"] == "before_compile":
        names = list(configs)
        peft_model = get_peft_model(model, configs[names[0]], adapter_name=names[0])
        for name in names[1:]:
            peft_model.add_adapter(name, configs[name])
        if record.get("active") and record["active"] != peft_model.active_adapter:
            peft_model.set_adapter(record["active"])
        return peft_model
    for name, config in configs.items():
        inject_adapter_in_model(config, model, adapter_name=name)
    return model
