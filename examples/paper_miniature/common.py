"""Small helpers the miniature's scripts share: device and precision, progress bars, run folders, JSON."""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
try:  # the scripts run from a checkout without `pip install -e .` too (the GPU machine)
    import hysparse_compile  # noqa: F401
except ImportError:  # pragma: no cover - depends on the environment
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,  # noqa: E402
                           TimeRemainingColumn)

console = Console(stderr=True, width=int(os.environ.get("COLUMNS", "120")))


def progress(label: str = "") -> Progress:
    """A rich progress bar with a free-text `info` field (loss, ms/step)."""
    return Progress(TextColumn(f"[bold]{label}" if label else "{task.description}"), BarColumn(),
                    MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                    console=console, transient=False)


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast(device: torch.device):
    """bf16 autocast on CUDA (the kernels run in bf16); fp32 on CPU (the reference backend, exact)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_name(variant: str, seed: int, tag: str | None = None) -> str:
    """Folder name of a run: `hysparse-1:3`, seed 0 -> `hysparse-1_3_s0` (tag "needle" -> `hysparse-1_3_s0_needle`)."""
    return f"{variant.replace(':', '_')}_s{seed}" + (f"_{tag}" if tag else "")


def write_json(path: Path, data) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=_jsonable) + "\n")
    return path


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def _jsonable(x):
    if hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serializable: {type(x).__name__}")


def finite(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def lr_at(step: int, total: int, *, peak: float, warmup: int, schedule: str, min_frac: float,
          decay_frac: float) -> float:
    """Learning rate at `step` (0-based): linear warmup, then cosine to min_frac*peak, or WSD (stable at peak, then a
    linear decay to min_frac*peak over the last decay_frac of the steps: the paper's schedule)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "cosine":
        t = (step - warmup) / max(1, total - warmup)
        return peak * (min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))
    decay_start = int(total * (1 - decay_frac))
    if step < decay_start:
        return peak
    t = (step - decay_start) / max(1, total - decay_start)
    return peak * (1 - (1 - min_frac) * min(1.0, t))
