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

import contextlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))  # `import oracle`, `import models` from any test folder
sys.path.insert(1, os.path.join(os.path.dirname(__file__), "kernels"))  # `import grid` (the shared oracle grid)
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def _interpreter_bf16_dot() -> None:
    """Let the Triton interpreter run `tl.dot` on bfloat16 operands, so the kernels' bf16 paths run in CPU CI.

    The interpreter stores bfloat16 as its uint16 bit pattern and `create_dot` multiplies those integers
    (triton-lang/triton#11584; upstream: "we just don't support it yet"). Widening a bf16 operand to float32 is
    exact, and the products are summed in the accumulator's dtype (float32), as the GPU's tensor cores do; every
    other bf16 step of the kernels (loads, stores, casts such as `p.to(v.dtype)`) already works in the interpreter.
    """
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except Exception:  # pragma: no cover - no triton
        return
    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_dot, "_bf16_widened", False):
        return
    original = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        def widen(x):
            if x.dtype.scalar != tl.bfloat16:
                return x
            data = interpreter._convert_float(x.data, tl.bfloat16, tl.float32, None).view(np.float32)
            return interpreter.TensorHandle(data, tl.float32)

        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    create_dot._bf16_widened = True
    builder.create_dot = create_dot


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_bf16_dot()


# ---------------------------------------------------------------------------------------------- --full
def pytest_addoption(parser):
    parser.addoption("--full", action="store_true", default=False,
                     help="run the whole kernel/oracle grid (tests marked full_grid); by default a deterministic "
                          "sample of it runs")


def pytest_configure(config):
    config.addinivalue_line("markers", "full_grid: a grid point outside the default sample; runs with --full")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--full"):
        return
    keep, dropped = [], []
    for item in items:
        (dropped if item.get_closest_marker("full_grid") else keep).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(autouse=True)
def _seeded_global_rng():
    """Every test starts from the same global RNG state, so a draw without an explicit generator (a weight init,
    a dropout mask, an overlooked `torch.randn`) is reproducible and independent of which tests ran before."""
    torch.manual_seed(0)
    yield


@pytest.fixture
def gen():
    """A fresh, seeded generator per test: inputs are random, never zeros, and reproducible."""
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def train_mode():
    """`train_mode(module)` switches a module (e.g. a shared, cached compiled model) to training mode for this test
    and restores every submodule's own flag afterwards, even when the test fails."""
    with contextlib.ExitStack() as stack:
        def switch(module: torch.nn.Module) -> torch.nn.Module:
            flags = [(m, m.training) for m in module.modules()]
            stack.callback(lambda: [m.train(flag) for m, flag in flags])
            return module.train()

        yield switch
