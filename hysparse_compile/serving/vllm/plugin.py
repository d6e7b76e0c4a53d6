"""`register()`: the `vllm.general_plugins` entry point.

Each architecture below is registered twice: under the family's own name (`LlamaForCausalLM`, which is what the
`config.json` of a checkpoint written by `compiled.save_pretrained` names) and under `HySparse<name>`. The class is a
subclass of vLLM's own for the family that turns HySparse only when the served directory holds a HySparse checkpoint
(`hysparse.json`), so other checkpoints of these families are served exactly as before. Set
`HYSPARSE_VLLM_OVERRIDE=0` to register only the `HySparse<name>` names (then pass
`hf_overrides={"architectures": ["HySparseLlamaForCausalLM"]}` to serve a checkpoint).
"""
from __future__ import annotations

import os

# architecture name in config.json -> model class in model.py
ARCHITECTURES = {
    "LlamaForCausalLM": "HySparseLlamaForCausalLM",
    "Qwen2ForCausalLM": "HySparseQwen2ForCausalLM",
    "Qwen3ForCausalLM": "HySparseQwen3ForCausalLM",
}
BACKEND = "hysparse_compile.serving.vllm.backend.HySparseAttentionBackend"
_DONE = [False]


def register() -> None:
    """Register the HYSPARSE attention backend and the model classes with vLLM (idempotent)."""
    if _DONE[0]:
        return
    from vllm import ModelRegistry
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from .backend import NAME

    if NAME not in AttentionBackendEnum.__members__:
        register_backend(NAME, BACKEND)
    from . import model  # the classes themselves: vLLM inspects them in-process, not in a spawned interpreter

    override = os.environ.get("HYSPARSE_VLLM_OVERRIDE", "1") != "0"
    for arch, name in ARCHITECTURES.items():
        cls = getattr(model, name)
        ModelRegistry.register_model(f"HySparse{arch}", cls)
        if override:
            ModelRegistry.register_model(arch, cls)
    _DONE[0] = True
