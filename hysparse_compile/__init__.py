"""hysparse_compile: compile ordinary PyTorch transformers into HySparse models.

    >>> import hysparse_compile as hs
    >>> hs.Schedule.hybrid(36, 3).num_full
    10
"""
from . import functional
from .schedule import PRESETS, LayerSpec, Schedule

__version__ = "0.1.0"

__all__ = ["Schedule", "LayerSpec", "PRESETS", "functional", "__version__"]


def __getattr__(name):  # heavier pieces load on first use
    if name == "compile":
        from .compiler import compile

        return compile
    if name == "inspect":
        from .inspect import inspect

        return inspect
    if name in ("plan_kv", "KVPlan"):
        from . import kv_plan

        return getattr(kv_plan, name)
    raise AttributeError(f"module 'hysparse_compile' has no attribute {name!r}")
