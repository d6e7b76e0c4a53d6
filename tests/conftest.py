import os
import sys

# Triton kernels run on CPU through the interpreter; it must be switched on before any kernel is defined.
if not os.environ.get("CUDA_VISIBLE_DEVICES") and "TRITON_INTERPRET" not in os.environ:
    try:
        import torch as _t

        if not _t.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    except Exception:  # pragma: no cover
        pass

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))  # `import oracle`, `import models` from any test folder
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def gen():
    """A fresh, seeded generator per test: inputs are random, never zeros, and reproducible."""
    return torch.Generator().manual_seed(1234)
