"""A fresh accelerate state around each training test: Trainer and Accelerator share a process-wide singleton that
refuses a second mixed-precision setting."""
import pytest


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    try:
        from accelerate.state import AcceleratorState
    except ImportError:  # accelerate is in the dev extra; without it only its own tests skip
        yield
        return
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
