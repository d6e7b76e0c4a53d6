"""`compiled.generate(...)` for HF models: transformers' own `GenerationMixin.generate` (greedy, sampling, streamers,
`return_dict_in_generate`, stopping criteria, ...) running the compiled module with a `HySparseCache`.

The compiled class of an HF model is `HySparse<Original>(HySparseModel, HFGenerationSupport)`; this mixin supplies
what `generate` reads from a `PreTrainedModel` (device, dtype, generation config) and makes the cache it prepares a
`HySparseCache` — dynamic by default, static (preallocated for the whole generation) with
`cache_implementation="static"`.
"""
from __future__ import annotations

import contextlib
import copy
import inspect as pyinspect

import torch

try:
    from transformers import GenerationConfig, GenerationMixin
except Exception:  # pragma: no cover - transformers is optional
    GenerationMixin = None


def _cache_kwarg(model) -> str:
    """The name the model's forward takes its cache by: `cache` (transformers >= 5.2x) or `past_key_values`."""
    params = pyinspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


if GenerationMixin is not None:

    class HFGenerationSupport(GenerationMixin):
        """What `GenerationMixin.generate` needs from a model that is not a `PreTrainedModel`."""

        main_input_name = "input_ids"
        _is_stateful = False
        _supports_cache_class = True

        @property
        def device(self) -> torch.device:
            return next(self.parameters()).device

        @property
        def dtype(self) -> torch.dtype:
            return next(p for p in self.parameters() if p.is_floating_point()).dtype

        @classmethod
        def can_generate(cls) -> bool:
            return True

        @classmethod
        def is_remote_code(cls) -> bool:
            return False

        def _supports_default_dynamic_cache(self) -> bool:
            return True

        def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
            """Put a HySparseCache where the forward expects it, unless the caller passed one."""
            from .cache import HySparseCache

            name = _cache_kwarg(self)
            given = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
            if given is not None:
                if not isinstance(given, HySparseCache):
                    raise TypeError(f"generate: the cache passed is a {type(given).__name__}; a compiled HySparse "
                                    f"model needs a hysparse_compile.HySparseCache (or none: one is made)")
                if getattr(generation_config, "cache_implementation", None) is not None:
                    raise ValueError("generate: pass either a cache or cache_implementation, not both")
                model_kwargs.pop("past_key_values" if name == "cache" else "cache", None)
                model_kwargs[name] = given
                return
            if generation_config.use_cache is False:
                return
            impl = getattr(generation_config, "cache_implementation", None)
            if impl not in (None, "dynamic", "static"):
                raise ValueError(f"generate: cache_implementation={impl!r} is not available for a HySparse model; "
                                 f"use None/'dynamic' or 'static' (a HySparseCache either way)")
            if impl == "static":
                batch = kwargs.get("batch_size", args[1] if len(args) > 1 else None)
                length = kwargs.get("max_cache_length", args[2] if len(args) > 2 else None)
                model_kwargs[name] = HySparseCache(self, batch_size=batch, max_cache_len=length)
            else:
                model_kwargs[name] = HySparseCache(self)

        def prepare_inputs_for_generation(self, input_ids, *args, **kwargs):
            """transformers' inputs, with the 2-D padding mask (the compiled graph takes [B, T] masks; recent
            transformers versions build a 4-D causal mask here for the original model's attention)."""
            inputs = super().prepare_inputs_for_generation(input_ids, *args, **kwargs)
            if "attention_mask" in inputs:  # None, or a 2-D mask: never the 4-D / per-layer-type dict HF builds
                inputs["attention_mask"] = kwargs.get("attention_mask")
            return inputs

        @contextlib.contextmanager
        def _optimize_model_for_decode(self, *args, **kwargs):
            yield  # the compiled graph is fixed: no kernel switching between prefill and decode

        def get_experts_implementation(self) -> dict:
            return {}

        def _valid_auto_compile_criteria(self, *args, **kwargs) -> bool:
            return False  # HF's auto torch.compile assumes its own static caches

else:  # pragma: no cover
    HFGenerationSupport = None


def generation_config_of(model):
    """A copy of an HF model's generation config (None for other models)."""
    config = getattr(model, "generation_config", None)
    if config is None and getattr(model, "config", None) is not None and GenerationMixin is not None:
        try:
            config = GenerationConfig.from_model_config(model.config)
        except Exception:
            config = None
    return copy.deepcopy(config)
