"""Shared pieces of the family tests (issue #20): one compiled model per (family, mode), built on first use and kept
for the session (torch.export is the slow part), and the cached-decode helper."""
import functools

import torch

import hysparse_compile as hs
import models
from models import hf_family

BLOCK = 16
CASES = {  # test name -> (family, attention implementation); sdpa where HF offers it for the family
    "gemma2": ("gemma2", "eager"),
    "gemma3": ("gemma3", "sdpa"),
    "mistral-window": ("mistral-window", "sdpa"),
    "gpt_oss": ("gpt_oss", "eager"),
    "falcon": ("falcon", "sdpa"),
}
CHUNKS = (19, 1, 1, 6, 1, 11, 1)  # 40 tokens: prefill, single tokens and extends crossing windows (8), blocks (16)


def names(*excluded):
    return [name for name in CASES if name not in excluded]


def ids(B, T, seed=0):
    return torch.randint(1, 128, (B, T), generator=torch.Generator().manual_seed(seed))


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@functools.lru_cache(maxsize=None)
def original(name: str):
    return hf_family(*CASES[name])


@functools.lru_cache(maxsize=None)
def paper(name: str):
    """(original, compiled) in paper mode: Schedule.from_model (Falcon, which has no sliding layers: FSSS), topk 32;
    gates and sinks initialized away from their defaults so that they matter."""
    model = original(name)
    options = dict(block_size=BLOCK, topk=2 * BLOCK)
    schedule = (hs.Schedule.from_pattern("FSSS", window=8, **options) if name == "falcon"
                else hs.Schedule.from_model(model, **options))
    return model, hs.compile(model, schedule, gate_init=lambda w: torch.nn.init.normal_(w, std=0.2), sink_init=0.5)


@functools.lru_cache(maxsize=None)
def training_free(name: str, topk: int = 0):
    """(original, compiled): Schedule.from_model(model, mode="training_free", topk=topk)."""
    model = original(name)
    return model, hs.compile(model, hs.Schedule.from_model(model, mode="training_free", topk=topk, block_size=BLOCK))


def sites(name: str):
    """The attention sites find_attention recorded for a family (those of its paper-mode compile)."""
    return paper(name)[1]._hysparse_state.sites


def cached_logits(compiled, tokens, chunks=CHUNKS):
    """Logits of `tokens` fed chunk by chunk through one HySparseCache (prefill, decode steps, extends)."""
    return models.cached_logits(compiled, tokens, chunks)
