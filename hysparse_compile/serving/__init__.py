"""Serving engines for HySparse checkpoints. `serving.vllm`: the vLLM plugin (install with the `[vllm]` extra)."""
