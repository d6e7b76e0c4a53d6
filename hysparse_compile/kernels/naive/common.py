"""Pieces every HySparse op's math shares: GQA grouping, scaled (soft-capped) logits, block maxima, block
selection, the selected-block table, key masks, the SWA ring's slot rule and the softmax with a sink.

Plain torch written to trace: no Python branch on tensor values, no reshape of a data-dependent length, so one
traced graph serves every batch and length (the exporters compile these functions into ONNX and AOTI files).

Shapes: q `[B, Hq, R, d]` (R query rows), k/v `[B, Hkv, S, d]` (S keys, key i at position i unless a position
tensor says otherwise), `G = Hq // Hkv` (query head h reads KV head h // G), positions int `[B | 1, R]`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

NEG_INF = float("-inf")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math accumulates in: float64 for float64 inputs, float32 for every other input dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def grouped(x: Tensor, Hkv: int) -> Tensor:
    """[B, Hq, R, d] -> [B, Hkv, G, R, d] (query head h belongs to KV group h // G)."""
    B, Hq, R, d = x.shape
    return x.reshape(B, Hkv, Hq // Hkv, R, d)


def logits(q: Tensor, k: Tensor, scale: float, softcap: float = 0.0) -> Tensor:
    """Scaled logits of every query row against every key, soft-capped when `softcap > 0`
    (`softcap * tanh(logits / softcap)`, Gemma 2). q [B, Hq, R, d], k [B, Hkv, S, d] -> [B, Hkv, G, R, S]."""
    s = torch.matmul(grouped(q, k.shape[1]), k.unsqueeze(2).transpose(-1, -2)) * scale  # broadcast over G
    return softcap * torch.tanh(s / softcap) if softcap else s


def weighted_sum(p: Tensor, v: Tensor) -> Tensor:
    """p [B, Hkv, G, R, S] @ v [B, Hkv, S, d] -> [B, Hq, R, d]. (Broadcast matmuls, no merge of a symbolic length
    into another axis: a traced graph would guard on that reshape's contiguity.)"""
    B, Hkv, G, R, S = p.shape
    return torch.matmul(p, v.unsqueeze(2)).reshape(B, Hkv * G, R, v.shape[-1])


def positions(query_pos: Tensor, R: int) -> Tensor:
    """Query positions as int64 [B | 1, R] (from [R] or [B | 1, R])."""
    return query_pos.long().reshape(-1, R)


def block_max(s: Tensor, block_size: int) -> Tensor:
    """[..., S] -> [..., nb + 1], nb = ceil(S / block_size): the max over each key block, plus one block past the end
    that is all -inf. The keys are gathered into a [nb + 1, block_size] grid (no reshape of a symbolic length, which a
    traced graph would guard on), and the extra block keeps the blocks axis >= 2, so one graph serves every length, a
    single block included; it is never a candidate for selection (it starts after every query)."""
    S = s.shape[-1]
    nb = (S + block_size - 1) // block_size
    grid = (torch.arange(nb + 1, device=s.device).unsqueeze(1) * block_size
            + torch.arange(block_size, device=s.device))  # [nb + 1, block_size] key positions
    blocks = s[..., grid.clamp(max=S - 1)]  # [..., nb + 1, block_size]
    return blocks.masked_fill(grid >= S, NEG_INF).amax(-1)


def select_blocks(group_scores: Tensor, block_size: int, nsel: int, query_pos: Tensor | None = None) -> Tensor:
    """The top `nsel` candidate blocks per row, as docs/design.md specifies the indices.

    group_scores: [B, Hkv, R, nb] float (group max over the GQA group); query_pos: int [R] or [B | 1, R], the
    position of each row's query (default: row r is position r, as in prefill). Candidates are blocks with
    `j * block_size <= position`. -> int32 [B, Hkv, R, nsel]: ascending block indices, -1 padding at the end.
    Ranking is a *stable* descending sort, so equal scores keep block order: ties go to the lower block on every
    runtime (torch.onnx writes the sort as ONNX TopK, whose ties also go to the lower index; `torch.topk` promises
    no tie order). A NaN score sorts first: a row whose scores are all NaN picks its lowest candidate blocks.

    >>> s = torch.tensor([[[[0.1, 0.5, 0.5, 0.2]]]])
    >>> select_blocks(s, 16, 2, torch.tensor([63])).tolist()
    [[[[1, 2]]]]
    """
    B, H, R, nb = group_scores.shape
    if query_pos is None:
        query_pos = torch.arange(R, device=group_scores.device)
    pos = positions(query_pos.to(group_scores.device), R)  # [B | 1, R]
    blocks = torch.arange(nb, device=group_scores.device)
    candidate = (blocks * block_size <= pos.unsqueeze(-1)).unsqueeze(1)  # [B | 1, 1, R, nb]
    scores = torch.where(candidate, group_scores, torch.full_like(group_scores, -1.0))
    # nsel columns of non-candidates at the end, so that there are always >= nsel columns to rank
    scores = F.pad(scores, (0, nsel), value=-2.0)  # [B, H, R, nb + nsel]
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :nsel]
    valid = torch.gather(candidate.expand(B, H, R, nb), -1, order.clamp(max=nb - 1)) & (order < nb)
    big = nb + nsel  # sorts after every real block
    chosen = torch.where(valid, order, torch.full_like(order, big))
    chosen = torch.sort(chosen, dim=-1).values  # ascending block order, padding last
    return torch.where(chosen == big, torch.full_like(chosen, -1), chosen).to(torch.int32)


def block_table(indices: Tensor, nb: int) -> Tensor:
    """The selection as a table: indices int [..., nsel] (-1 = none) -> bool [..., nb + 1], True at each selected
    block (column nb collects the padding and anything out of range, and is ignored)."""
    idx = indices.long()
    idx = torch.where((idx >= 0) & (idx < nb), idx, torch.full_like(idx, nb))
    table = torch.zeros(*indices.shape[:-1], nb + 1, dtype=torch.bool, device=indices.device)
    return table.scatter(-1, idx, True)


def block_key_mask(indices: Tensor, S: int, block_size: int) -> Tensor:
    """Keys 0..S-1 inside each row's selected blocks (no causality): indices int [B, Hkv, R, nsel] (-1 = none)
    -> bool [B, Hkv, R, S]."""
    B, Hkv, R, _ = indices.shape
    nb = (S + block_size - 1) // block_size
    key_block = torch.div(torch.arange(S, device=indices.device), block_size, rounding_mode="floor")
    return torch.gather(block_table(indices, nb), -1, key_block.expand(B, Hkv, R, S))


def selected_keys(indices: Tensor, block_size: int, S: int, query_pos: Tensor) -> Tensor:
    """Keys 0..S-1 each row may read in the sparse branch: in one of its selected blocks and at or before its
    position. indices int [B, Hkv, R, nsel]; query_pos int [B | 1, R] -> bool [B, Hkv, R, S]."""
    R = indices.shape[2]
    causal = torch.arange(S, device=indices.device).view(1, 1, S) <= positions(query_pos, R).unsqueeze(-1)
    return block_key_mask(indices, S, block_size) & causal.unsqueeze(1)  # causal: [B | 1, R, S]


def window_keys(key_pos: Tensor, query_pos: Tensor, window: int) -> Tensor:
    """Keys inside each row's window (position - window, position]: key_pos int [K] or [B | 1, K] (-1 = an empty
    slot), query_pos int [B | 1, R] -> bool [B | 1, R, K]."""
    kp = key_pos.long().reshape(-1, 1, key_pos.shape[-1])
    qp = query_pos.long().unsqueeze(-1)
    return (kp >= 0) & (kp <= qp) & (kp > qp - window)


def ring_positions(lengths: Tensor, W: int) -> Tensor:
    """The SWA ring's slot rule: position p lives in slot p % W. After `lengths[b]` tokens, the position each slot
    holds is the latest p < lengths[b] with p % W == slot, or -1. lengths int [B] -> int64 [B, W]."""
    slots = torch.arange(W, device=lengths.device).view(1, W)
    last = lengths.reshape(-1, 1).long() - 1
    pos = last - torch.remainder(last - slots, W)
    return torch.where(pos >= 0, pos, torch.full_like(pos, -1))


def softmax_with_sink(s: Tensor, mask: Tensor, v: Tensor, sink: Tensor | None) -> tuple[Tensor, Tensor]:
    """Masked softmax attention with an optional sink logit in the denominator (gpt-oss): an extra "key" of logit
    `sink` and value 0, so `o = sum_i exp(s_i) v_i / (sum_i exp(s_i) + exp(sink))`.

    s [B, Hkv, G, R, K] logits, mask bool broadcastable to it, v [B, Hkv, K, d], sink [Hkv, G] or None
    -> out [B, Hq, R, d] (0 where nothing is visible), lse of the keys alone [B, Hkv, G, R] (-inf where no key)
    """
    s = s.masked_fill(~mask, NEG_INF)
    m = s.amax(dim=-1, keepdim=True)
    sink_b = None if sink is None else sink.reshape(1, *sink.shape, 1, 1).to(s.dtype)
    if sink_b is not None:
        m = torch.maximum(m, sink_b)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    keys_sum = e.sum(-1, keepdim=True)
    denom = keys_sum if sink_b is None else keys_sum + torch.exp(sink_b - m)
    denom = torch.where(denom > 0, denom, torch.ones_like(denom))
    return weighted_sum(e / denom, v), (torch.log(keys_sum) + m).squeeze(-1)


def sink_logits(sinks: Tensor | None, Hkv: int, dtype: torch.dtype) -> Tensor | None:
    """Per-head sink logits [Hq] -> [Hkv, G] in `dtype` (None stays None)."""
    return None if sinks is None else sinks.to(dtype).reshape(Hkv, sinks.shape[0] // Hkv)
