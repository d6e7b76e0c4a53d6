"""The miniature's model variants: name -> how to build it (plain module, or `hs.compile` of one) and its schedule.

    python examples/paper_miniature/variants.py --context 4096      # every variant's layer pattern and options

| variant | what | paper |
|---|---|---|
| `full` | every layer full attention (plain SDPA) | Full-Attn |
| `swa-1:3`, `swa-1:7` | plain module; the `S` layers of `Schedule.hybrid(n, r)` use a sliding window | Hybrid SWA |
| `hysparse-1:3`, `hysparse-1:7` | `hs.compile(model, Schedule.hybrid(n, r, block_size=, topk=, window=))` | HySparse |
| `no-swa` | 1:3, `swa=False` (sparse branch only) | Table 4, w/o intra-layer SWA |
| `kv-both` | 1:3, `kv_sharing="both"` (both branches read the full layer's K/V) | Table 4, sharing for SA & SWA |
| `kv-none` | 1:3, `kv_sharing="none"` (sparse branch on the layer's own K/V) | Table 4, w/o KV sharing |

Sparse settings scale with the context (`sparse_settings`): block 64 and window 128 as in the paper (Table 1) once the
context is >= 2048, top-k = context / 8 (the paper's 1024 of its 8k pre-training length); toy contexts use block 16.
"""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field, replace

import torch

import common  # noqa: F401  (puts the repo root on sys.path when the package is not installed)
import hysparse_compile as hs
from model import GPT, GPTConfig


@dataclass(frozen=True)
class SparseSettings:
    block_size: int
    topk: int
    window: int


def sparse_settings(context: int, *, block_size: int | None = None, topk: int | None = None,
                    window: int | None = None) -> SparseSettings:
    """Paper defaults scaled to `context` (see the module docstring); any value given wins."""
    block = block_size or (64 if context >= 2048 else 16)
    k = topk or max(2 * block, (context // 8) // block * block)
    w = window or (128 if context >= 2048 else max(16, context // 16))
    return SparseSettings(block, k, w)


@dataclass(frozen=True)
class Variant:
    name: str
    kind: str  # "full" | "swa" | "hysparse"
    ratio: int = 0  # sparse layers per full layer (hybrid pattern)
    options: dict = field(default_factory=dict)  # extra Schedule options (ablations)
    paper: str = ""


VARIANTS = {v.name: v for v in [
    Variant("full", "full", paper="Full-Attn"),
    Variant("swa-1:3", "swa", 3, paper="Hybrid SWA"),
    Variant("swa-1:7", "swa", 7, paper="Hybrid SWA"),
    Variant("hysparse-1:3", "hysparse", 3, paper="HySparse (sharing only for SA)"),
    Variant("hysparse-1:7", "hysparse", 7, paper="HySparse"),
    Variant("no-swa", "hysparse", 3, {"swa": False}, paper="HySparse w/o intra-layer SWA"),
    Variant("kv-both", "hysparse", 3, {"kv_sharing": "both"}, paper="HySparse (sharing for SA & SWA)"),
    Variant("kv-none", "hysparse", 3, {"kv_sharing": "none"}, paper="HySparse w/o KV sharing (oracle selection)"),
]}
NAMES = tuple(VARIANTS)


def schedule_for(variant: str, n_layer: int, sparse: SparseSettings, **extra) -> hs.Schedule | None:
    """The HySparse schedule of a variant (None for the plain ones)."""
    v = VARIANTS[variant]
    if v.kind != "hysparse":
        return None
    return hs.Schedule.hybrid(n_layer, v.ratio, block_size=sparse.block_size, topk=sparse.topk,
                              window=sparse.window, **{**v.options, **extra})


def pattern_for(variant: str, n_layer: int) -> str:
    """F/S letters per layer (S = sliding window for `swa-*`, sparse for HySparse)."""
    v = VARIANTS[variant]
    return "F" * n_layer if v.kind == "full" else hs.Schedule.hybrid(n_layer, v.ratio).pattern


def model_config(variant: str, base: GPTConfig, sparse: SparseSettings) -> GPTConfig:
    """The plain module's config: SWA variants get band-masked layers where the hybrid pattern has 'S'."""
    swa = [i for i, c in enumerate(pattern_for(variant, base.n_layer)) if c == "S"]
    return replace(base, window=sparse.window, swa_layers=swa if VARIANTS[variant].kind == "swa" else [])


def example_ids(cfg: GPTConfig, device) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (1, min(cfg.context, 256)), device=device)


def compile_plain(plain: GPT, schedule: hs.Schedule, *, device, backend: str = "auto"):
    """`hs.compile` of the plain module on `device` (its weights are shared, not copied)."""
    return hs.compile(plain, schedule, example_inputs=(example_ids(plain.cfg, device),), backend=backend)


@dataclass
class Built:
    model: torch.nn.Module  # what trains and evaluates: ids [B, T] -> logits [B, T, vocab]
    plain: GPT  # the uncompiled module (shares its weights with `model`)
    schedule: hs.Schedule | None
    cfg: GPTConfig


def build(variant: str, base: GPTConfig, sparse: SparseSettings, *, device, backend: str = "auto") -> Built:
    cfg = model_config(variant, base, sparse)
    plain = GPT(cfg).to(device)
    schedule = schedule_for(variant, cfg.n_layer, sparse)
    model = plain if schedule is None else compile_plain(plain, schedule, device=device, backend=backend)
    return Built(model, plain, schedule, cfg)


def run_config(variant: str, base: GPTConfig, sparse: SparseSettings, built: Built) -> dict:
    """What `load_run` needs to rebuild a run (written to config.json)."""
    return {"variant": variant, "model": built.cfg.to_dict(), "base_model": base.to_dict(), "sparse": asdict(sparse),
            "pattern": pattern_for(variant, base.n_layer),
            "schedule": None if built.schedule is None else built.schedule.to_dict()}


def load_run(config: dict, state_dict: dict, *, device, backend: str = "auto") -> Built:
    """Rebuild a trained run from its config.json and model.pt state_dict (gates and sinks included)."""
    base = GPTConfig.from_dict(config["base_model"])
    built = build(config["variant"], base, SparseSettings(**config["sparse"]), device=device, backend=backend)
    built.model.load_state_dict(state_dict)
    return built


def training_free(plain: GPT, ratio: int, sparse: SparseSettings, topk: int, *, device, backend: str = "auto"):
    """A trained full-attention module compiled with mode="training_free" (no new weights) at `topk`."""
    schedule = hs.Schedule.hybrid(plain.cfg.n_layer, ratio, block_size=sparse.block_size, topk=topk,
                                  window=sparse.window, mode="training_free")
    return compile_plain(plain, schedule, device=device, backend=backend)


def all_full(plain: GPT, sparse: SparseSettings, *, device, backend: str = "auto"):
    """The full model through the HySparse runtime (every layer 'F'): its KV cache and decode speed are the
    like-for-like baseline of `hs.generate`."""
    schedule = hs.Schedule.from_pattern("F" * plain.cfg.n_layer, block_size=sparse.block_size, topk=sparse.topk,
                                        window=sparse.window)
    return compile_plain(plain, schedule, device=device, backend=backend)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="print every variant's pattern and options")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=8)
    args = ap.parse_args()
    s = sparse_settings(args.context)
    print(f"context {args.context}: {s}")
    for name, v in VARIANTS.items():
        sched = schedule_for(name, args.layers, s)
        opts = {} if sched is None else {k: sched.to_dict()[k] for k in ("kv_sharing", "swa", "sinks", "gate")}
        print(f"{name:14s} {pattern_for(name, args.layers)}  {v.kind:8s} {opts}  ({v.paper})")
