"""Whether Triton kernels run through Triton's CPU interpreter (`TRITON_INTERPRET=1`), read from the environment.

Kept apart from `kernels/triton` so that `kernels/backends.py` can ask without importing Triton."""
from __future__ import annotations

import os


def triton_interpret() -> bool:
    """`TRITON_INTERPRET=1` is set: Triton kernels run on the CPU, interpreted (how the kernel tests run in CI)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
