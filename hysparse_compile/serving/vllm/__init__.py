"""The vLLM plugin: serve checkpoints written by `compiled.save_pretrained` with `vllm serve DIR` or `LLM(model=DIR)`.

vLLM loads `register` from the `vllm.general_plugins` entry point in every process it starts. It registers the
HYSPARSE attention backend and the HySparse model classes (docs/serving.md). Importing this package does not import
vLLM; `register` does.
"""
from .plugin import ARCHITECTURES, register

__all__ = ["ARCHITECTURES", "register"]
