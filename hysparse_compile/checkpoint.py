"""Checkpoints of compiled HySparse models: `compiled.save_pretrained(dir)` and `hs.from_pretrained(dir)`.

    compiled.save_pretrained("ckpt/")
    compiled = hs.from_pretrained("ckpt/")                          # HF: the model class is rebuilt from config.json
    compiled = hs.from_pretrained("ckpt/", model=MyGPT())           # other models: an instance of the original module
    compiled = hs.from_pretrained("ckpt/", device="cuda", dtype=torch.bfloat16)

The directory holds:
- `config.json` — HF models only: the original model's config (its own `save_pretrained`), with `architectures`
  naming the original class when the config did not already;
- `schedule.json` — the schedule (`Schedule.dump`);
- `hysparse.json` — format version, compile options (`backend`, `gate_init` when it was a float, `sink_init`), the
  original class, the HF attention implementation, the example shape the model was captured with, the dtype of the
  weights, the aliases of tied weights, and the PEFT adapters (`peft`: their configs, and whether they were applied
  before compile — the model compiled was a `PeftModel` — or injected into the compiled model; see adapters.py);
- `model.safetensors` — every tensor of `compiled.state_dict()` (original weights, gates and sinks). Tensors that
  share storage (tied embeddings) are written once; `hysparse.json["aliases"]` maps each other name to the one
  written (safetensors refuses shared storage).

Loading builds the original model (HF: the class named in `hysparse.json` / `config.json` from the config, with the
saved attention implementation; otherwise the `model=` instance), loads its weights, moves it to `device` and
`dtype` (default: CPU and the saved weights' dtype), compiles it there with the saved schedule and options, and
loads every weight of the checkpoint strictly. The result computes what the saved model computed. Adapters are
re-created first: LoRA applied before compile is applied to the rebuilt original (`get_peft_model`), which is then
compiled; adapters injected after compile are injected into the compiled model (`peft.inject_adapter_in_model`).

`transformers.Trainer` treats a compiled HF model as the `PreTrainedModel` it is (runtime/hf.py) and writes its
checkpoints (`output_dir/checkpoint-N/`) with `compiled.save_pretrained`, so `hs.from_pretrained` loads them and
`trainer.train(resume_from_checkpoint=...)` reads their `model.safetensors` back into the compiled model.

This module knows the format and nothing of the compiler: `HySparseModel` inherits `save_pretrained` from
`CheckpointSupport`, and `hs.from_pretrained` (compiler.py) hands `load` the function that compiles.
"""
from __future__ import annotations

import copy
import json
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn as nn

FORMAT = 1
CONFIG, SCHEDULE, META, WEIGHTS = "config.json", "schedule.json", "hysparse.json", "model.safetensors"
_PREFIX = "HySparse"  # compiler._compiled_class names the class HySparse<original class>


class CheckpointSupport:
    """`save_pretrained` of a compiled model (`HySparseModel` inherits it)."""

    def save_pretrained(self, save_directory, *, state_dict: dict | None = None, is_main_process: bool = True,
                        safe_serialization: bool = True) -> Path:
        """Write the original config (HF models), `schedule.json`, `hysparse.json` (compile options) and
        `model.safetensors` (every weight of `state_dict()`, gates and sinks included) to `save_directory`;
        `hysparse_compile.from_pretrained(save_directory)` rebuilds the model (module docstring).
        `state_dict` (the weights to write instead of `self.state_dict()`, same keys) and `is_main_process` (False
        writes nothing) are what `transformers.Trainer` passes; only safetensors is written."""
        if safe_serialization is not True:
            raise ValueError("save_pretrained writes safetensors only (safe_serialization=False is not supported)")
        if not is_main_process:
            return Path(save_directory)
        return save_pretrained(self, save_directory, state_dict=state_dict)


def _compiled_or_raise(compiled):
    if not isinstance(compiled, CheckpointSupport):
        raise TypeError(f"save_pretrained takes a module returned by hysparse_compile.compile, got "
                        f"{type(compiled).__name__}")
    return compiled


def _is_hf_config(config) -> bool:
    return config is not None and callable(getattr(config, "save_pretrained", None)) and \
        callable(getattr(config, "to_json_string", None))


def _architecture(compiled) -> str | None:
    name = type(compiled).__name__
    return name[len(_PREFIX):] if name.startswith(_PREFIX) and len(name) > len(_PREFIX) else None


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _dtype_of(value) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    dtype = getattr(torch, str(value).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype must be a torch.dtype or its name (e.g. 'bfloat16'), got {value!r}")
    return dtype


def _unshared(state_dict: dict) -> tuple[dict, dict]:
    """(tensors to write, aliases): tensors that are the same view of one storage are written once; tensors that
    overlap otherwise get their own copy. Everything ends on the CPU, contiguous."""
    tensors, aliases, first = {}, {}, {}
    for name, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"save_pretrained: state_dict entry {name!r} is a {type(t).__name__}, not a tensor; "
                            f"only tensors can be written to safetensors")
        t = t.detach()
        if t.device.type == "meta":
            raise ValueError(f"save_pretrained: {name!r} is on the meta device (it has no values to save)")
        if t.numel() == 0:
            tensors[name] = t.clone()
            continue
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if key in first:
            aliases[name] = first[key]
            continue
        first[key] = name
        tensors[name] = t
    owners = defaultdict(list)
    for name, t in tensors.items():
        if t.numel():
            owners[(t.device, t.untyped_storage().data_ptr())].append(name)
    for names in owners.values():
        if len(names) > 1:
            for name in names:
                tensors[name] = tensors[name].clone()
    return {name: t.to("cpu").contiguous() for name, t in tensors.items()}, aliases


def save_pretrained(compiled, directory, *, state_dict: dict | None = None) -> Path:
    """Write `compiled` (an `hs.compile` result) to `directory` (created if needed); returns the directory.
    state_dict: the tensors to write instead of `compiled.state_dict()` (e.g. gathered from sharded training); it
    must have the same keys."""
    from safetensors.torch import save_file

    from . import __version__, adapters
    from .graph import portable

    compiled = _compiled_or_raise(compiled)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = compiled.compile_state
    own = compiled.state_dict()
    if state_dict is not None and set(state_dict) != set(own):
        missing, extra = sorted(set(own) - set(state_dict)), sorted(set(state_dict) - set(own))
        raise ValueError(f"save_pretrained: state_dict does not have the compiled model's keys (missing "
                         f"{missing[:5]}, unexpected {extra[:5]})")
    tensors, aliases = _unshared(own if state_dict is None else state_dict)
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt"})
    compiled.schedule.dump(out / SCHEDULE)
    arch = _architecture(compiled)
    hf = _is_hf_config(compiled.config)
    if hf:
        config = copy.deepcopy(compiled.config)
        if arch and not getattr(config, "architectures", None):
            config.architectures = [arch]
        config.save_pretrained(str(out))
    gate_init = state.options.get("gate_init", 0.0)
    meta = {
        "format": FORMAT,
        "hysparse_compile": __version__,
        "torch": torch.__version__,
        "architecture": arch,
        "hf": hf,
        "attn_implementation": getattr(compiled.config, "_attn_implementation", None) if hf else None,
        "backend": state.backend,
        "options": {"gate_init": float(gate_init) if isinstance(gate_init, (int, float)) else None,
                    "sink_init": float(state.options.get("sink_init", 0.0)),
                    "save_branches": bool(state.options.get("save_branches", False))},
        "example_shape": None if state.generated_example or state.example_shape is None else list(state.example_shape),
        "dtype": _dtype_name(portable.floating_dtype(compiled)),
        "aliases": aliases,
        "peft": adapters.peft_record(compiled),
        "schedule": compiled.schedule.to_dict(),  # what the weights were trained for: checked against schedule.json
    }
    (out / META).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def _read_meta(directory: Path) -> dict:
    path = directory / META
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a HySparse checkpoint: no such folder (write one with "
                                f"compiled.save_pretrained({str(directory)!r}))")
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a HySparse checkpoint: {META} is missing (write one with "
                                f"compiled.save_pretrained({str(directory)!r}))")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); it is written by compiled.save_pretrained: restore it or "
                         f"save the checkpoint again") from e
    if not isinstance(meta, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: checkpoint format {meta.get('format')!r}; this hysparse_compile reads format "
                         f"{FORMAT}")
    _check_meta_fields(path, meta)
    return meta


def _check_meta_fields(path: Path, meta: dict) -> None:
    """The fields `from_pretrained` reads have the types `save_pretrained` writes (an edited file is named)."""
    options = meta.get("options", {})
    if not isinstance(options, dict):
        raise ValueError(f"{path}: options must be an object, got {options!r}")
    for key, value in options.items():
        if key not in ("gate_init", "sink_init", "save_branches"):
            raise ValueError(f"{path}: unknown compile option {key!r} in options; valid: gate_init, sink_init, "
                             f"save_branches")
        kind = (bool,) if key == "save_branches" else (int, float)
        if value is not None and (not isinstance(value, kind) or (kind != (bool,) and isinstance(value, bool))):
            raise ValueError(f"{path}: options.{key} must be {'true or false' if key == 'save_branches' else 'a number'}"
                             f" (or null), got {value!r}")
    backend = meta.get("backend", "auto")
    if backend not in ("auto", "reference", "flex", "triton"):
        raise ValueError(f"{path}: backend must be one of 'auto', 'reference', 'flex', 'triton', got {backend!r}")
    aliases = meta.get("aliases", {})
    if not isinstance(aliases, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()):
        raise ValueError(f"{path}: aliases must map weight names to weight names, got {aliases!r}")
    try:
        _dtype_of(meta.get("dtype"))
    except ValueError:
        raise ValueError(f"{path}: dtype must name a torch dtype (e.g. 'float32', 'bfloat16'), got "
                         f"{meta.get('dtype')!r}") from None
    shape = meta.get("example_shape")
    if shape is not None and not (isinstance(shape, list) and len(shape) == 2
                                  and all(isinstance(n, int) and n > 0 for n in shape)):
        raise ValueError(f"{path}: example_shape must be [batch, seq_len] (positive ints) or null, got {shape!r}")


def _read_schedule(directory: Path, meta: dict, schedule):
    """schedule.json, checked against the schedule hysparse.json says the weights were saved with; `schedule` (a
    Schedule given to from_pretrained) overrides both deliberately."""
    from .schedule import Schedule

    if schedule is not None:
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a hysparse_compile.Schedule, got {type(schedule).__name__}")
        return schedule
    path = directory / SCHEDULE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a complete HySparse checkpoint: {SCHEDULE} is missing (it is "
                                f"written by compiled.save_pretrained)")
    loaded = Schedule.load(path)
    saved = meta.get("schedule")
    if saved is not None and Schedule.from_dict(saved, source=f"{META} schedule") != loaded:
        was = Schedule.from_dict(saved).to_dict()
        now = loaded.to_dict()
        diff = ", ".join(f"{k} {was.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(was) | set(now))
                         if was.get(k) != now.get(k))
        raise ValueError(f"{path} differs from the schedule the weights were saved with ({META}: {diff}); restore "
                         f"it, or pass the schedule deliberately: hs.from_pretrained({str(directory)!r}, "
                         f"schedule=hs.Schedule(...))")
    return loaded


def _load_weights(directory: Path) -> dict:
    from safetensors.torch import load_file

    path = directory / WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a complete HySparse checkpoint: {WEIGHTS} is missing (it is "
                                f"written by compiled.save_pretrained)")
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own SafetensorError (not an OSError) for a damaged file
        raise ValueError(f"{path} cannot be read ({type(e).__name__}: {e}); the file is truncated or not a "
                         f"safetensors file: save the checkpoint again") from e


def _hf_model(directory: Path, meta: dict) -> nn.Module:
    import transformers

    if not (directory / CONFIG).is_file():
        raise FileNotFoundError(f"{directory} was saved from an HF model but {CONFIG} is missing (it is written by "
                                f"compiled.save_pretrained); restore it, or pass model= an instance of the original")
    try:
        config = transformers.AutoConfig.from_pretrained(str(directory))
    except (ValueError, OSError, KeyError) as e:
        raise ValueError(f"{directory / CONFIG} cannot be read as a transformers config ({e})") from e
    attn = meta.get("attn_implementation")
    name = meta.get("architecture") or next(iter(getattr(config, "architectures", None) or []), None)
    cls = getattr(transformers, name, None) if name else None
    kwargs = {"attn_implementation": attn} if attn else {}
    if name is None:
        return transformers.AutoModelForCausalLM.from_config(config, **kwargs).eval()
    if not (isinstance(cls, type) and issubclass(cls, nn.Module) and hasattr(cls, "_from_config")):
        raise ValueError(f"{directory} was saved from {name}, which is not a transformers class: pass model= an "
                         f"instance of it (hs.from_pretrained({str(directory)!r}, model={name}(config)))")
    return cls._from_config(config, **kwargs).eval()


def _load_original(model: nn.Module, weights: dict, directory: Path) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    if missing:
        raise ValueError(f"{directory / WEIGHTS} does not fit the model given ({type(model).__name__}): it lacks "
                         f"{missing[:5]}{' ...' if len(missing) > 5 else ''}; pass model= an instance of the module "
                         f"that was compiled")
    bad = [k for k, v in own.items() if tuple(v.shape) != tuple(weights[k].shape)]
    if bad:
        raise ValueError(f"{directory / WEIGHTS} does not fit the model given ({type(model).__name__}): shapes differ "
                         f"for {[(k, tuple(weights[k].shape), tuple(own[k].shape)) for k in bad[:3]]}")
    model.load_state_dict({k: weights[k] for k in own}, strict=True)


def load(directory, *, compile, model: nn.Module | None = None, device=None, dtype=None, example_inputs=None,
         schedule=None):
    """Rebuild a compiled HySparse model written by `compiled.save_pretrained(directory)`: the body of
    `hs.from_pretrained` (compiler.py, which documents the arguments), given `compile`, the function that compiles.
    Damaged or edited files are refused naming the file and what is wrong (docs/errors.md, "Checkpoints").
    """
    from . import adapters
    from .passes import capture

    directory = Path(directory)
    meta = _read_meta(directory)
    schedule = _read_schedule(directory, meta, schedule)
    weights = _load_weights(directory)
    for alias, target in meta.get("aliases", {}).items():
        weights[alias] = weights[target]
    if model is None:
        if not meta.get("hf"):
            raise ValueError(f"{directory} was saved from a {meta.get('architecture') or 'plain PyTorch'} model "
                             f"without a transformers config: pass model= an instance of that module "
                             f"(hs.from_pretrained({str(directory)!r}, model=MyModel(...)))")
        model = _hf_model(directory, meta)
    elif not isinstance(model, nn.Module):
        raise TypeError(f"model must be an instance of the original torch.nn.Module, got {type(model).__name__}")
    dtype = _dtype_of(dtype) if dtype is not None else _dtype_of(meta.get("dtype"))
    peft = meta.get("peft")
    if peft is not None and peft["order"] == "before_compile" and not capture.is_peft(model):
        model = adapters.apply(model, peft)  # LoRA then compile, as it was saved
    if peft is None or peft["order"] == "before_compile":
        _load_original(model, weights, directory)  # else: the compiled model with its adapters loads them below
    if device is not None or dtype is not None:
        model.to(device=torch.device(device) if device is not None else None, dtype=dtype)
    if example_inputs is None and meta.get("example_shape"):
        vocab = capture.vocab_size(model)
        if vocab is not None:
            g = torch.Generator().manual_seed(0)
            example_inputs = torch.randint(0, vocab, tuple(meta["example_shape"]), generator=g).to(
                capture.model_device(model))
    options = {k: v for k, v in meta.get("options", {}).items() if v is not None}
    compiled = compile(model, schedule, example_inputs=example_inputs, backend=meta.get("backend", "auto"), **options)
    if peft is not None and peft["order"] == "after_compile":
        adapters.apply(compiled, peft)
    try:
        compiled.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{directory / WEIGHTS} does not fit the model compiled from it ({e}); was it saved from "
                         f"another model or schedule?") from e
    return compiled


__all__ = ["CheckpointSupport", "save_pretrained", "load", "FORMAT"]
