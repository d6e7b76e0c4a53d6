"""The HF surface of a compiled HF model: transformers' `GenerationMixin.generate` (greedy, sampling, streamers,
`return_dict_in_generate`, stopping criteria, ...) running the compiled module with a `HySparseCache`, and what
`Trainer`, accelerate and PEFT read from a `PreTrainedModel`.

The compiled class of an HF model is `HySparse<Original>(HySparseModel, HFGenerationSupport)`, and
`HFGenerationSupport` is a `PreTrainedModel` (and a `GenerationMixin`), so the tools that branch on
`isinstance(model, PreTrainedModel)` take their HF path: `Trainer` saves checkpoints with the compiled model's own
`save_pretrained` (which `hs.from_pretrained` loads), `type(compiled).from_pretrained(dir)` is
`hs.from_pretrained(dir)` (the compiled class defines it: compiler.py). `PreTrainedModel.__init__` is never run (it
would re-check, and could change, the shared config's attention implementation); `init_hf` sets the instance
attributes it would have set. What a
PreTrainedModel does by replacing or re-initializing modules (`resize_token_embeddings`, `init_weights`,
`set_input_embeddings`) cannot reach the compiled graph and raises, saying what to do instead.

    >>> compiled = hs.compile(LlamaForCausalLM(config), schedule)
    >>> isinstance(compiled, transformers.PreTrainedModel), compiled.num_parameters() > 0
    (True, True)
    >>> compiled.generate(ids, max_new_tokens=8)  # a HySparseCache: dynamic, or static with cache_implementation
"""
from __future__ import annotations

import contextlib
import copy
import inspect as pyinspect

import torch

try:
    from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
except Exception:  # pragma: no cover - transformers is optional
    GenerationMixin = None


def _cache_kwarg(model) -> str:
    """The name the model's forward takes its cache by: `cache` (transformers >= 5.2x) or `past_key_values`."""
    params = pyinspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


if GenerationMixin is not None:

    class HFGenerationSupport(PreTrainedModel, GenerationMixin):
        """What `generate`, `Trainer`, accelerate and PEFT need from a `PreTrainedModel`, for a compiled HF model (whose
        `PreTrainedModel.__init__` never runs: `init_hf` sets the attributes it would set)."""

        main_input_name = "input_ids"
        supports_gradient_checkpointing = True  # each decoder layer's region of the graph (checkpointing.py)
        _is_stateful = False
        _supports_cache_class = True

        def init_hf(self, original) -> None:
            """Copy what a `PreTrainedModel` instance carries from `original` (the model given to compile; for a PEFT
            model, the transformers model inside it). The config object is shared, as the weights are."""
            self.name_or_path = getattr(original, "name_or_path", getattr(self.config, "name_or_path", ""))
            self.loss_type = getattr(original, "loss_type", None)
            self.generation_config = generation_config_of(original)
            self._keep_in_fp32_modules = set(getattr(original, "_keep_in_fp32_modules", None) or ())
            self.all_tied_weights_keys = {}  # nothing to re-tie: tied tensors are shared objects in the graph
            self.warnings_issued = {}
            for key in ("_no_split_modules", "base_model_prefix", "_input_embed_layer"):
                if hasattr(original, key):
                    setattr(self, key, getattr(original, key))

        @property
        def _keys_to_ignore_on_save(self) -> list[str] | None:
            """The names `save_pretrained` does not write: each further name of a tied tensor (checkpoint.py writes
            it once). `Trainer`'s resume then knows that their absence from the checkpoint is expected."""
            seen, aliases = set(), []
            for name, tensor in self.state_dict(keep_vars=True).items():
                if id(tensor) in seen:
                    aliases.append(name)
                seen.add(id(tensor))
            return aliases or None

        def post_init(self):
            raise RuntimeError("post_init / init_weights would re-initialize the compiled model's (shared) weights; "
                               "a compiled model is built from an initialized original model")

        init_weights = post_init

        def resize_token_embeddings(self, *args, **kwargs):
            raise NotImplementedError("resize_token_embeddings on a compiled model would replace the embedding "
                                      "module outside the graph, which reads its weight by name; resize the original "
                                      "model's embeddings first (model.resize_token_embeddings(n)), then hs.compile it")

        def set_input_embeddings(self, value):
            raise NotImplementedError("set_input_embeddings on a compiled model: the graph reads the embedding weight "
                                      "by name and would not see a new module; set it on the original model, then "
                                      "hs.compile it (or copy weights in place: compiled.get_input_embeddings()."
                                      "weight.data.copy_(...))")

        def set_output_embeddings(self, value):
            raise NotImplementedError("set_output_embeddings on a compiled model: the graph reads the output "
                                      "projection's weight by name and would not see a new module; set it on the "
                                      "original model, then hs.compile it")

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

        def generate(self, inputs=None, generation_config=None, **kwargs):
            """transformers' `generate`, refusing up front what a HySparseCache cannot serve: assisted decoding and
            prompt lookup (they crop the cache after rejected draft tokens). Beam search is supported (the cache
            reorders its rows)."""
            asked = {key: kwargs.get(key, getattr(generation_config, key, None))
                     for key in ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit")}
            asked = sorted(key for key, value in asked.items() if value is not None)
            if asked:
                raise ValueError(f"generate: assisted decoding ({', '.join(asked)}) is not supported by a compiled "
                                 f"HySparse model: it crops the cache back after rejected draft tokens, and the "
                                 f"sparse layers' SWA rings cannot be rolled back (their evicted tokens are gone). "
                                 f"Generate without it (greedy, sampling and num_beams work)")
            return super().generate(inputs, generation_config, **kwargs)

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
