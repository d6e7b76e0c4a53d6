"""hysparse_compile: compile ordinary PyTorch transformers into HySparse models.

    >>> import hysparse_compile as hs
    >>> hs.Schedule.hybrid(36, 3).num_full
    10
"""
from . import functional
from .schedule import PRESETS, LayerSpec, Schedule

__version__ = "0.1.0"

__all__ = ["Schedule", "LayerSpec", "PRESETS", "functional", "compile", "inspect", "Report", "plan_kv", "KVPlan",
           "HySparseCache", "generate", "from_pretrained", "inductor_options", "__version__"]


_LAZY = {"compile": ("compiler", "compile"), "inspect": ("report", "inspect"), "Report": ("report", "Report"),
         "plan_kv": ("kv_plan", "plan_kv"), "KVPlan": ("kv_plan", "KVPlan"),
         "HySparseCache": ("runtime.cache", "HySparseCache"), "generate": ("runtime.generate", "generate"),
         "from_pretrained": ("compiler", "from_pretrained"),
         "inductor_options": ("inductor", "inductor_options")}


def __getattr__(name):  # heavier pieces (torch.export, transformers glue) load on first use
    if name not in _LAZY:
        raise AttributeError(f"module 'hysparse_compile' has no attribute {name!r}")
    import importlib

    module, attr = _LAZY[name]
    value = getattr(importlib.import_module(f".{module}", __name__), attr)
    globals()[name] = value
    return value
