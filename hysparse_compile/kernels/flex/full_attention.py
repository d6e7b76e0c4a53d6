"""Flex full-attention layer: causal FlexAttention for out and lse, block scores and selection in query chunks.

FlexAttention cannot expose per-block row maxima, so the block scores are recomputed from q.k^T one query chunk at
a time (at most [B, Hq, chunk, T] float32 logits alive), turned into probabilities with the lse that flex returned,
max-reduced per key block and over the GQA group, and ranked by the naive math's `select_blocks`. Soft-capping is a
`score_mod`; a per-head sink rescales flex's output by the sink's share of the denominator, `sigmoid(lse - sink)`.

Also home of `flex_attend`, the one place that calls flex_attention (compiled on CUDA, eager on CPU; see there).
The backward recomputes the flex forward under autograd: a second implementation and a baseline, not a fast path.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from functools import lru_cache

import torch
from torch import Tensor
from torch.nn.attention import flex_attention as _fa

from .. import naive
from ..reference import full_attention_decode as _torch_full_decode

Q_BLOCK = 128  # flex's query tile for every block mask we build (its default sparse block size)
_CHUNK_ELEMS = {"cuda": 1 << 27, "cpu": 1 << 23}  # float32 logits per scoring chunk (512 MiB on CUDA); see below

_compiled = None


def _compiled_flex():
    """torch.compile(flex_attention), built once per process."""
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(_fa.flex_attention, dynamic=False, fullgraph=True)
    return _compiled


def _recompile_limit_patch():
    """Every (shape, mask) pair is its own compiled graph: lift dynamo's recompile limit around flex calls."""
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    return cfg.patch(**{name: max(256, getattr(cfg, name))})


def _identity_score(score, b, h, q_idx, kv_idx):
    return score


@lru_cache(maxsize=16)
def softcap_score(softcap: float):
    """The score_mod of logit soft-capping, `softcap * tanh(score / softcap)` (None when softcap is 0: no mod)."""
    if not softcap:
        return None

    def soft_capped(score, b, h, q_idx, kv_idx):
        return softcap * torch.tanh(score / softcap)

    return soft_capped


def _hop_attend(q: Tensor, k: Tensor, v: Tensor, block_mask, scale: float, score_mod=None):
    """Eager flex through its higher-order op: the public function refuses backward on CPU, the op itself does not.
    Same math (flex's dense implementation); lse comes back in log2 units."""
    opts = _fa._apply_kernel_options(q, k, v, True, None, None)
    out, lse, _ = _fa.flex_attention_hop(q, k, v, score_mod or _identity_score, block_mask.as_tuple(), scale, opts)
    return out, lse * math.log(2.0)


def kernel_options(device: torch.device, q_block: int, kv_block: int) -> dict | None:
    """Tile sizes that divide the block mask's sparse blocks (flex errors out when its default tiles do not)."""
    if device.type != "cuda" or (q_block >= 128 and kv_block >= 128):
        return None
    m, n = min(128, q_block), min(64, kv_block)
    return {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_M1": min(64, m), "BLOCK_N1": n, "BLOCK_M2": min(64, m),
            "BLOCK_N2": n}


DECODING_ROWS = 64  # most packed query rows (query length x GQA group) left to flex's decoding kernel


def kernel_choice(q: Tensor, k: Tensor, block_mask, options: dict | None) -> dict | None:
    """`options` with flex's main kernel forced where Inductor would pick its decoding kernel for too many rows.

    On CUDA, below 128 query rows and with a one-head block mask, Inductor runs flex's decoding kernel, which packs
    a KV head's (query length x G) rows into one tile and finds no valid configuration once they are many (torch
    2.11, H100: an extend call of 64 rows at G = 4 failed with NoValidChoicesError; 8 rows ran). Past DECODING_ROWS
    packed rows the main kernel is forced; it ran the 64-row call there. The threshold sits between the two points
    measured (32 rows ran on the decoding kernel, 256 did not); counts in between were not tried."""
    rows = q.shape[2] * (q.shape[1] // k.shape[1])
    if (q.device.type != "cuda" or q.shape[2] >= 128 or block_mask.kv_num_blocks.shape[1] != 1
            or rows <= DECODING_ROWS):
        return options
    return {**(options or {}), "FORCE_USE_FLEX_ATTENTION": True}


def flex_attend(q: Tensor, k: Tensor, v: Tensor, block_mask, scale: float, options: dict | None = None,
                score_mod=None):
    """out [B, Hq, R, d] (q's dtype), lse float32 [B, Hq, R] (natural log, -inf for rows with no key).

    q [B, Hq, R, d], k/v [B, Hkv, S, d]; GQA through flex's enable_gqa (query head h reads KV head h // G);
    score_mod: flex's (e.g. `softcap_score(c)`), None for plain logits.
    CUDA: torch.compile(flex_attention), cached once per process (one graph per shape and mask; dynamo's recompile
    limit is lifted around the call). CPU: eager flex -- compiled flex on CPU is inference-only and cannot return
    the lse (torch 2.13), and eager spares CI the 15-30 s compiles; when autograd is recording on CPU, flex's own
    higher-order op is called directly (the public function refuses CPU backward; the op's math path does it).
    """
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if q.device.type == "cpu" and needs_grad:
        return _hop_attend(q, k, v, block_mask, scale, score_mod)
    if not needs_grad:  # inside the op's forward the inputs may still carry requires_grad: eager flex refuses them
        q, k, v = q.detach(), k.detach(), v.detach()
    gqa = q.shape[1] != k.shape[1]
    aux = {"return_aux": _fa.AuxRequest(lse=True)} if hasattr(_fa, "AuxRequest") else {"return_lse": True}
    if q.device.type == "cpu":
        with warnings.catch_warnings():  # eager flex warns that it is unfused: on CPU that is the choice
            warnings.simplefilter("ignore", UserWarning)
            out, res = _fa.flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                                          enable_gqa=gqa, **aux)
    else:
        with _recompile_limit_patch():
            out, res = _compiled_flex()(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                                        enable_gqa=gqa, kernel_options=kernel_choice(q, k, block_mask, options),
                                        **aux)
    lse = res.lse if hasattr(res, "lse") else res
    return out, lse.float()


def _causal(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx


@lru_cache(maxsize=32)
def causal_block_mask(T: int, device: torch.device):
    """Causal BlockMask for T queries and keys (cached per shape and device)."""
    return _fa.create_block_mask(_causal, None, None, T, T, device=device, _compile=device.type == "cuda")


@contextlib.contextmanager
def scoring_chunk_elems(n: int):
    """Within the block, each block-scoring chunk of `block_scores_and_select` holds at most `n` logits on every
    device (at least one query row). Tests force small chunks so the chunk offsets run at small T. Not thread-safe.

    >>> with scoring_chunk_elems(1):
    ...     _chunk_rows(1, 4, 100, torch.device("cpu"))
    1
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"scoring_chunk_elems takes a positive int (logits per chunk), got {n!r}")
    old = dict(_CHUNK_ELEMS)
    _CHUNK_ELEMS.update({device: n for device in ("cuda", "cpu")})
    try:
        yield
    finally:
        _CHUNK_ELEMS.clear()
        _CHUNK_ELEMS.update(old)


def _chunk_rows(B: int, Hq: int, T: int, device: torch.device) -> int:
    return max(1, min(T, _CHUNK_ELEMS.get(device.type, 1 << 23) // max(1, B * Hq * T)))


def with_sink(o: Tensor, lse: Tensor, sinks: Tensor | None) -> Tensor:
    """o * exp(lse) / (exp(lse) + exp(sink)) in float32: o [B, Hq, R, d], lse [B, Hq, R], sinks [Hq]."""
    o = o.float()
    if sinks is None:
        return o
    return o * torch.sigmoid(lse - sinks.float().view(1, -1, 1)).unsqueeze(-1)


def block_scores_and_select(q: Tensor, k: Tensor, lse: Tensor, block_size: int, nsel: int, scale: float,
                            return_scores: bool, *, softcap: float = 0.0, sinks: Tensor | None = None,
                            query_pos: Tensor | None = None):
    """Block scores from q.k^T and lse, chunk by chunk over queries, then selection.

    q [B, Hq, R, d], k [B, Hkv, S, d], lse float32 [B, Hq, R] (keys alone; the sink joins the denominator here);
    query_pos int [B | 1, R] (None: a prefill, row t at position t over keys 0..t)
    -> indices int32 [B, Hkv, R, nsel], scores float32 [B, Hq, R, nb] (or None unless return_scores)
    """
    B, Hq, R, _ = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    nb = -(-S // block_size)
    ct = naive.compute_dtype(q.dtype)
    kf = k.to(ct)  # [B, Hkv, S, d], converted once
    den = lse if sinks is None else torch.logaddexp(lse, sinks.float().view(1, -1, 1))
    indices = torch.empty(B, Hkv, R, nsel, dtype=torch.int32, device=q.device)
    scores = torch.zeros(B, Hq, R, nb, dtype=torch.float32, device=q.device) if return_scores else None
    step = _chunk_rows(B, Hq, S, q.device)
    for r0 in range(0, R, step):
        r1 = min(R, r0 + step)
        pos = torch.arange(r0, r1, device=q.device).view(1, -1) if query_pos is None else query_pos[:, r0:r1]
        keys = r1 if query_pos is None else S  # a prefill chunk reads keys up to its last row
        s = naive.logits(q[:, :, r0:r1].to(ct), kf[:, :, :keys], scale, softcap)  # [B, Hkv, G, C, keys]
        future = torch.arange(keys, device=q.device).view(1, 1, keys) > pos.unsqueeze(-1)
        s = s.masked_fill(future.unsqueeze(1).unsqueeze(1), float("-inf"))
        s = torch.exp(naive.block_max(s, block_size) - den[:, :, r0:r1].view(B, Hkv, G, -1, 1))  # [.., nbc + 1]
        if scores is not None:
            nbc = s.shape[-1] - 1
            scores[:, :, r0:r1, :nbc] = s[..., :nbc].reshape(B, Hq, r1 - r0, -1).float()
        indices[:, :, r0:r1] = naive.select_blocks(s.amax(dim=2), block_size, nsel, pos)
        del s
    return indices, scores


def full_attention_fwd(q: Tensor, k: Tensor, v: Tensor, block_size: int, topk: int, scale: float,
                       return_scores: bool, *, sinks: Tensor | None = None, softcap: float = 0.0):
    """q [B, Hq, T, d], k/v [B, Hkv, T, d] -> out [B, Hq, T, d], indices int32 [B, Hkv, T, nsel],
    lse float32 [B, Hq, T] (sinks excluded), scores float32 [B, Hq, T, nb] (empty unless return_scores)."""
    T = q.shape[2]
    with torch.no_grad():
        out, lse = flex_attend(q, k, v, causal_block_mask(T, q.device), scale, score_mod=softcap_score(softcap))
        indices, scores = block_scores_and_select(q, k, lse, block_size, topk // block_size, scale, return_scores,
                                                  softcap=softcap, sinks=sinks)
    if sinks is not None:
        out = with_sink(out, lse, sinks).to(q.dtype)
    return out, indices, lse, scores if scores is not None else q.new_empty(0, dtype=torch.float32)


def full_attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float, *,
                       sinks: Tensor | None = None, softcap: float = 0.0):
    """Causal-attention gradients by recomputing the flex forward under autograd (sinks are constants here: the op
    computes their gradient). Returns dq, dk, dv."""
    with torch.enable_grad():
        qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
        o, l = flex_attend(qg, kg, vg, causal_block_mask(q.shape[2], q.device), scale,
                           score_mod=softcap_score(softcap))
        if sinks is not None:
            o = with_sink(o, l, sinks.detach())
        dq, dk, dv = torch.autograd.grad(o, (qg, kg, vg), dout.to(o.dtype))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def full_attention_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_len: Tensor, block_size: int,
                          topk: int, scale: float, *, sinks: Tensor | None = None, softcap: float = 0.0):
    """One query row per sequence: the reference's naive math over the cache (flex gains nothing on a single row).

    q [B, Hq, 1, d], k_cache/v_cache [B, Hkv, S, d], cache_len int [B] -> out [B, Hq, 1, d], indices [B, Hkv, 1, nsel]
    """
    return _torch_full_decode(q, k_cache, v_cache, cache_len, block_size, topk, scale, sinks=sinks, softcap=softcap)
