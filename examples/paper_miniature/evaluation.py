"""What the miniature measures on a model: held-out loss by position, needle retrieval by depth, KV-cache bytes, and
the tokens/s of cached greedy decoding. `train.py` runs it once at the end of training (on the model it already has)
and `evaluate.py` on saved runs; both call `evaluate_model`, so the numbers come from one place.

    >>> settings = EvalSettings.for_context(4096)
    >>> row = evaluate_model(built, corpus, settings, device=torch.device("cuda"))
    >>> row["loss_by_bucket"], row["retrieval"]["single"]["acc"], row["kv_bytes"], row["decode_tok_s"]
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

import common
import hysparse_compile as hs
import model as model_lib
from corpus import VALUE_LEN, Corpus, probe_set

DEPTHS = (0.0, 0.25, 0.5, 0.75, 0.9, 0.98)


@dataclass
class EvalSettings:
    context: int
    buckets: list  # [[lo, hi), ...] position buckets
    depths: tuple = DEPTHS
    eval_seqs: int = 32  # held-out windows for the loss
    probe_samples: int = 16  # needle probes per depth and probe kind
    distractors: dict = field(default_factory=lambda: {"single": 0, "multikey": 2})
    batch: int = 8
    decode_prompt: int = 0  # 0: context - decode_new
    decode_new: int = 64

    @classmethod
    def for_context(cls, context: int, **overrides) -> "EvalSettings":
        """Buckets 0-1/16, 1/16-1/4, 1/4-1/2, 1/2-1 of the context (0-256, 256-1k, 1k-2k, 2k-4k at 4096)."""
        edges = [0, context // 16, context // 4, context // 2, context]
        return cls(context=context, buckets=[[a, b] for a, b in zip(edges, edges[1:])], **overrides)

    def to_dict(self) -> dict:
        return asdict(self)


def logits_of(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.logits


@torch.no_grad()
def loss_by_position(model, windows: np.ndarray, *, device, batch: int) -> np.ndarray:
    """Mean next-byte loss (nats) at each position over windows uint8 [N, T+1] -> float64 [T]."""
    total = None
    for i in range(0, len(windows), batch):
        x = torch.from_numpy(np.asarray(windows[i:i + batch], dtype=np.int64)).to(device)
        with common.autocast(device):
            logits = logits_of(model(x[:, :-1]))
        loss = F.cross_entropy(logits.float().transpose(1, 2), x[:, 1:], reduction="none")  # [b, T]
        s = loss.sum(0).double().cpu().numpy()
        total = s if total is None else total + s
    return total / len(windows)


def bucket_means(per_position: np.ndarray, buckets) -> list[float]:
    return [float(per_position[lo:hi].mean()) for lo, hi in buckets]


@torch.no_grad()
def retrieval(model, probes, *, device, batch: int) -> dict:
    """Teacher-forced scores of the 6 value bytes per depth, each a list over depths in [0, 1]:
    `acc` (share of the bytes whose argmax is right; chance 1/36), `exact` (all 6 right: what greedy decoding would
    get), `loss` (mean cross-entropy of the value bytes, nats/byte; a model that ignores the needle can do no better
    than ln 36 = 3.58, the values being uniform over 36 characters) and `control_loss` (the same on the probe's control
    copy without the needle line). `control_loss - loss` is what the needle is worth to the model, in nats per value
    byte: 0 without retrieval, up to ~3.6 for perfect recall. Unlike the accuracy it moves before exact recall
    emerges (the paper's "loss on the far tokens" in spirit)."""
    acc, exact, distance, loss, control = [], [], [], [], []
    for at_depth in probes:
        hits, nats, nats_control = [], [], []
        for i in range(0, len(at_depth), batch):
            chunk = at_depth[i:i + batch]
            vs = chunk[0].value_start
            x = torch.from_numpy(np.stack([p.tokens for p in chunk]).astype(np.int64)).to(device)
            target = x[:, vs:vs + VALUE_LEN]
            with common.autocast(device):
                logits = logits_of(model(x))[:, vs - 1:vs - 1 + VALUE_LEN].float()  # predicts bytes vs .. vs+5
            hits.append((logits.argmax(-1) == target).float().cpu())
            nats.append(F.cross_entropy(logits.transpose(1, 2), target, reduction="none").cpu())
            if chunk[0].control is not None:
                xc = torch.from_numpy(np.stack([p.control for p in chunk]).astype(np.int64)).to(device)
                with common.autocast(device):
                    lc = logits_of(model(xc))[:, vs - 1:vs - 1 + VALUE_LEN].float()
                nats_control.append(F.cross_entropy(lc.transpose(1, 2), target, reduction="none").cpu())
        h = torch.cat(hits)  # [samples, VALUE_LEN]
        acc.append(float(h.mean()))
        exact.append(float(h.all(-1).float().mean()))
        distance.append(float(np.mean([p.distance for p in at_depth])))
        loss.append(float(torch.cat(nats).mean()))
        control.append(float(torch.cat(nats_control).mean()) if nats_control else None)
    return {"acc": acc, "exact": exact, "distance": distance, "loss": loss, "control_loss": control}


def kv_bytes(model, plain: model_lib.GPT, context: int, *, compiled: bool) -> int:
    """KV-cache bytes at `context` tokens, batch 1, bf16: the compiled model's `HySparseCache` (what the runtime
    allocates, equal to its plan), or what `generate_plain` keeps for a plain module."""
    if compiled:
        return hs.HySparseCache(model, batch_size=1, max_cache_len=context, dtype=torch.bfloat16,
                                device="cpu").nbytes
    return model_lib.kv_cache_bytes(plain.cfg, context, itemsize=2)


@torch.no_grad()
def decode_tok_s(model, prompt: torch.Tensor, new: int, *, device, compiled: bool) -> float:
    """Tokens/s of cached greedy decoding, batch 1, prefill excluded: `hs.generate` with a static bf16
    `HySparseCache` for compiled models (fp32 on CPU), `generate_plain` for plain ones, under the training autocast.
    Times generate(new + 1) minus generate(1), after a warm-up."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def run(n):
        common.sync(device)
        t = time.perf_counter()
        with common.autocast(device):
            if compiled:
                cache = hs.HySparseCache(model, batch_size=prompt.shape[0], max_cache_len=prompt.shape[1] + n,
                                         dtype=dtype)
                hs.generate(model, prompt, max_new_tokens=n, cache=cache)
            else:
                model_lib.generate_plain(model, prompt, n)
        common.sync(device)
        return time.perf_counter() - t

    run(2)  # warm-up: kernels compiled, allocator primed
    t1, tn = run(1), run(new + 1)
    return new / max(tn - t1, 1e-9)


def evaluate_model(built, corpus: Corpus, settings: EvalSettings, *, device, decode: bool = True,
                   windows: np.ndarray | None = None, probes: dict | None = None, runtime_twin=None) -> dict:
    """Every metric of one model (a `variants.Built`, or anything with .model/.plain/.schedule).

    runtime_twin: for a plain module, the same weights compiled with every layer full (`variants.all_full`): its
    KV bytes and `hs.generate` speed are reported too, as the like-for-like baseline of the compiled variants."""
    was_training = built.model.training
    built.model.eval()
    T = settings.context
    if windows is None:
        windows = corpus.fixed_windows("val", count=settings.eval_seqs, length=T + 1)
    if probes is None:
        probes = {kind: probe_set(corpus.val, context=T, depths=settings.depths, samples=settings.probe_samples,
                                  distractors=n) for kind, n in settings.distractors.items()}
    per_pos = loss_by_position(built.model, windows, device=device, batch=settings.batch)
    compiled = built.schedule is not None
    row = {
        "val_loss": float(per_pos.mean()),
        "loss_by_bucket": bucket_means(per_pos, settings.buckets),
        "retrieval": {kind: retrieval(built.model, p, device=device, batch=settings.batch)
                      for kind, p in probes.items()},
        "kv_bytes": kv_bytes(built.model, built.plain, T, compiled=compiled),
    }
    if decode and settings.decode_new > 0:
        P = settings.decode_prompt or T - settings.decode_new
        prompt = torch.from_numpy(np.asarray(windows[0, :P], dtype=np.int64))[None].to(device)
        row["decode_prompt"], row["decode_new"] = P, settings.decode_new
        row["decode_tok_s"] = decode_tok_s(built.model, prompt, settings.decode_new, device=device,
                                           compiled=compiled) if compiled else None
        if not compiled:
            row["decode_tok_s_plain"] = decode_tok_s(built.plain, prompt, settings.decode_new, device=device,
                                                     compiled=False)
        if runtime_twin is not None:
            row["decode_tok_s"] = decode_tok_s(runtime_twin, prompt, settings.decode_new, device=device,
                                               compiled=True)
    if runtime_twin is not None:
        row["kv_bytes_runtime"] = kv_bytes(runtime_twin, built.plain, T, compiled=True)
    built.model.train(was_training)
    return row
