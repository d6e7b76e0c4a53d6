"""The HySparse ops as plain ATen-level torch, for exporters that cannot call back into Python.

`ep.run_decompositions(DECOMPOSITIONS)` replaces every `hysparse::full_attention` / `hysparse::sparse_attention`
node (and the decode ops, `*_decode`) of an ExportedProgram with these functions' ops, so the graph holds only
standard ATen ops: torch.onnx turns them into standard ONNX ops (`ops="standard"`), AOTInductor compiles them into a
CPU package. (The exporters apply the same table while capturing: `program.replace_ops`.)

They compute exactly what docs/design.md specifies (the reference backend is the ground truth they are tested
against), with one difference in *how*: everything is one tensor expression over the whole sequence (no query
chunks, no Python loops, no data-dependent shapes), so one traced graph serves every batch and length. The price is
memory: each layer materializes its `[B, Hq, T, T]` logits (the kernels never do).

Selection is deterministic on every runtime: blocks are ranked by a *stable* descending sort of the group scores
(equal scores keep block order, so ties go to the lower block index as SPEC §2.1 says); torch.onnx writes that sort
as ONNX `TopK`, whose ties also go to the lower index. `torch.topk` is not used: it promises no tie order.

    >>> import torch
    >>> from hysparse_compile.export.decompositions import DECOMPOSITIONS
    >>> sorted(str(op) for op in DECOMPOSITIONS)[:2]
    ['hysparse.full_attention.default', 'hysparse.full_attention_decode.default']
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..kernels import ops  # noqa: F401  (registers torch.ops.hysparse.*)

NEG_INF = float("-inf")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grouped(x: Tensor, Hkv: int) -> Tensor:
    """[B, Hq, T, d] -> [B, Hkv, G, T, d] (query head h belongs to KV group h // G)."""
    B, Hq, T, d = x.shape
    return x.reshape(B, Hkv, Hq // Hkv, T, d)


def _like_q(x: Tensor, q: Tensor) -> Tensor:
    """x [B, Hq, T, d] in q's dtype and memory layout, as the ops' fake implementations return it
    (`empty_like(q)`): code after the op may `view` it in a way only that layout allows. (`aten.copy` is the
    functional copy: decomposition tables may not mutate.)"""
    return torch.ops.aten.copy.default(torch.empty_like(q), x)


def _positions(T, device) -> tuple[Tensor, Tensor]:
    """rows [T, 1] and keys [1, T] positions."""
    pos = torch.arange(T, device=device)
    return pos.unsqueeze(1), pos.unsqueeze(0)


# ---------------------------------------------------------------------------------------------- full attention
def block_max(logits: Tensor, block_size: int) -> Tensor:
    """[..., Tk] -> [..., nb + 1], nb = ceil(Tk / block_size): the max over each key block, plus one block past the
    end that is all -inf. The keys are gathered into a [nb + 1, block_size] grid (no reshape of a symbolic length,
    which a traced graph would guard on), and the extra block keeps the blocks axis >= 2, so one graph serves every
    length, a single block included; it is never a candidate for selection (it starts after every query)."""
    Tk = logits.shape[-1]
    nb = (Tk + block_size - 1) // block_size
    grid = (torch.arange(nb + 1, device=logits.device).unsqueeze(1) * block_size
            + torch.arange(block_size, device=logits.device))  # [nb + 1, block_size] key positions
    blocks = logits[..., grid.clamp(max=Tk - 1)]  # [..., nb + 1, block_size]
    return blocks.masked_fill(grid >= Tk, NEG_INF).amax(-1)


def select_blocks(group_scores: Tensor, block_size: int, nsel: int, query_pos: Tensor | None = None) -> Tensor:
    """The top `nsel` candidate blocks per row, as docs/design.md specifies the indices.

    group_scores: [B, Hkv, R, nb] float; query_pos: int [B, R] position of each row's query (default: row r is
    position r, as in prefill). Candidates are blocks with j*B <= position (trailing blocks past the sequence never
    are). -> int32 [B, Hkv, R, nsel]: ascending block indices, -1 padding at the end.
    """
    B, H, R, nb = group_scores.shape
    if query_pos is None:
        query_pos = torch.arange(R, device=group_scores.device).unsqueeze(0)  # [1, R]
    blocks = torch.arange(nb, device=group_scores.device)
    candidate = (blocks * block_size <= query_pos.unsqueeze(-1)).unsqueeze(1)  # [B | 1, 1, R, nb]
    scores = torch.where(candidate, group_scores, torch.full_like(group_scores, -1.0))
    # nsel columns of non-candidates at the end, so that there are always >= nsel columns to rank
    scores = F.pad(scores, (0, nsel), value=-2.0)  # [B, H, R, nb + nsel]
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :nsel]  # ties: lower index first
    valid = torch.gather(scores, -1, order) >= 0  # a candidate (scores are >= 0)
    big = nb + nsel  # sorts after every real block
    chosen = torch.where(valid, order, torch.full_like(order, big))
    chosen = torch.sort(chosen, dim=-1).values  # ascending block order, padding last
    return torch.where(chosen == big, torch.full_like(chosen, -1), chosen).to(torch.int32)


def full_attention(q: Tensor, k: Tensor, v: Tensor, block_size: int, topk: int, scale: float,
                   return_scores: bool, backend: str = "auto"):
    """`hysparse::full_attention` as plain torch: out [B, Hq, T, d], indices int32 [B, Hkv, T, nsel],
    lse float32 [B, Hq, T], scores float32 [B, Hq, T, nb] (or empty). `backend` is ignored."""
    B, Hq, T, d = q.shape
    Hkv = k.shape[1]
    ct = _compute_dtype(q.dtype)
    rows, keys = _positions(T, q.device)
    logits = torch.matmul(_grouped(q.to(ct), Hkv), k.to(ct).unsqueeze(2).transpose(-1, -2)) * scale
    logits = logits.masked_fill(keys > rows, NEG_INF)  # [B, Hkv, G, T, T]
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # [B, Hkv, G, T, 1]
    out = torch.matmul(torch.exp(logits - lse), v.to(ct).unsqueeze(2)).reshape(B, Hq, T, d)
    scores = torch.exp(block_max(logits, block_size) - lse)  # [B, Hkv, G, T, nb + 1]; 0 for future blocks
    indices = select_blocks(scores.amax(dim=2), block_size, topk // block_size)
    nb = (T + block_size - 1) // block_size
    scores_out = (scores[..., :nb].reshape(B, Hq, T, nb).float() if return_scores
                  else torch.empty(0, dtype=torch.float32, device=q.device))
    return _like_q(out, q), indices, lse.reshape(B, Hq, T).float(), scores_out


# ---------------------------------------------------------------------------------------------- sparse attention
def selected_key_mask(indices: Tensor, block_size: int) -> Tensor:
    """Keys each query row may read in the sparse branch: in a selected block and causal.

    indices int32 [B, Hkv, T, nsel] (-1 = none) -> bool [B, Hkv, 1, T, T]
    """
    B, Hkv, T, nsel = indices.shape
    nb = (T + block_size - 1) // block_size
    idx = indices.long()
    idx = torch.where((idx >= 0) & (idx < nb), idx, torch.full_like(idx, nb))  # out of range -> a dummy column
    blocks = torch.zeros(B, Hkv, T, nb + 1, dtype=torch.bool, device=indices.device).scatter(-1, idx, True)
    rows, keys = _positions(T, indices.device)
    key_block = torch.div(keys.expand(T, T), block_size, rounding_mode="floor")  # [T, T]
    mask = torch.gather(blocks, -1, key_block.expand(B, Hkv, T, T))  # [B, Hkv, T, T]
    return (mask & (keys <= rows)).unsqueeze(2)


def window_key_mask(T, window: int, device) -> Tensor:
    """Keys in each row's window (t - window, t]: bool [T, T]."""
    rows, keys = _positions(T, device)
    return (keys <= rows) & (keys > rows - window)


def softmax_with_sink(logits: Tensor, mask: Tensor, v: Tensor, sink: Tensor | None):
    """Masked softmax attention with an optional sink logit in the denominator (as the reference's masked_probs).

    logits [B, Hkv, G, T, T], mask broadcastable to it, v [B, Hkv, T, d], sink [Hkv, G] or None
    -> out [B, Hkv, G, T, d], lse of the keys alone [B, Hkv, G, T] (-inf where no key is visible)
    """
    s = logits.masked_fill(~mask, NEG_INF)
    m = s.amax(dim=-1, keepdim=True)
    sink_b = None if sink is None else sink.reshape(1, *sink.shape, 1, 1).to(s.dtype)
    if sink_b is not None:
        m = torch.maximum(m, sink_b)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    keys_sum = e.sum(-1, keepdim=True)
    denom = keys_sum if sink_b is None else keys_sum + torch.exp(sink_b - m)
    denom = torch.where(denom > 0, denom, torch.ones_like(denom))
    out = torch.matmul(e / denom, v.unsqueeze(2))
    return out, (torch.log(keys_sum) + m).squeeze(-1)


def sparse_attention(q: Tensor, k_own: Tensor, v_own: Tensor, k_shared: Tensor, v_shared: Tensor, indices: Tensor,
                     gate_sparse: Tensor | None, gate_swa: Tensor | None, sinks: Tensor | None, block_size: int,
                     window: int, scale: float, merge: bool, save_branches: bool, backend: str = "auto"):
    """`hysparse::sparse_attention` as plain torch: out [B, Hq, T, d], lse float32 [B, Hq, T, 2], branch_out
    [2, B, Hq, T, d] (ungated sparse/merged and SWA outputs) when save_branches, else empty. `backend` is ignored."""
    B, Hq, T, d = q.shape
    Hkv = k_shared.shape[1]
    ct = _compute_dtype(q.dtype)
    qg = _grouped(q.to(ct), Hkv)  # [B, Hkv, G, T, d]
    sink = None if sinks is None else sinks.to(ct).reshape(Hkv, Hq // Hkv)
    sel = selected_key_mask(indices, block_size)  # [B, Hkv, 1, T, T]
    logits_sh = torch.matmul(qg, k_shared.to(ct).unsqueeze(2).transpose(-1, -2)) * scale
    neg_inf = torch.full((B, Hq, T), NEG_INF, dtype=torch.float32, device=q.device)
    if merge:  # training-free: one softmax over selected blocks ∪ window of the layer's own K/V (passed as shared)
        mask = sel | window_key_mask(T, window, q.device) if window else sel
        o, lse = softmax_with_sink(logits_sh, mask, v_shared.to(ct), sink)
        o = o.reshape(B, Hq, T, d)
        lse = torch.stack([lse.reshape(B, Hq, T).float(), neg_inf], -1)
        return _like_q(o, q), lse, _branches(save_branches, o, torch.zeros_like(o), q)
    o_sp, lse_sp = softmax_with_sink(logits_sh, sel, v_shared.to(ct), sink)
    o_sp = o_sp.reshape(B, Hq, T, d)
    out = o_sp * gate_sparse.to(ct) if gate_sparse is not None else o_sp
    lse_swa, o_swa = neg_inf, torch.zeros_like(o_sp)
    if window:
        logits_own = torch.matmul(qg, k_own.to(ct).unsqueeze(2).transpose(-1, -2)) * scale
        o_swa, lse_w = softmax_with_sink(logits_own, window_key_mask(T, window, q.device), v_own.to(ct), sink)
        o_swa = o_swa.reshape(B, Hq, T, d)
        out = out + (o_swa * gate_swa.to(ct) if gate_swa is not None else o_swa)
        lse_swa = lse_w.reshape(B, Hq, T).float()
    lse = torch.stack([lse_sp.reshape(B, Hq, T).float(), lse_swa], -1)
    return _like_q(out, q), lse, _branches(save_branches, o_sp, o_swa, q)


def _branches(save: bool, first: Tensor, second: Tensor, q: Tensor) -> Tensor:
    return torch.stack([first, second]).to(q.dtype) if save else q.new_empty(0)


# ---------------------------------------------------------------------------------------------- decode
def full_attention_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_len: Tensor, block_size: int,
                          topk: int, scale: float, backend: str = "auto"):
    """`hysparse::full_attention_decode` as plain torch: the new token at position cache_len - 1.

    q [B, Hq, 1, d], k_cache/v_cache [B, Hkv, S, d], cache_len int [B] -> out [B, Hq, 1, d], indices [B, Hkv, 1, nsel]
    """
    B, Hq, _, d = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    ct = _compute_dtype(q.dtype)
    pos = (cache_len.long() - 1).reshape(B, 1)  # [B, 1]
    logits = torch.matmul(_grouped(q.to(ct), Hkv), k_cache.to(ct).unsqueeze(2).transpose(-1, -2)) * scale
    future = torch.arange(S, device=q.device).unsqueeze(0) > pos  # [B, S]
    logits = logits.masked_fill(future.reshape(B, 1, 1, 1, S), NEG_INF)  # [B, Hkv, G, 1, S]
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    out = torch.matmul(torch.exp(logits - lse), v_cache.to(ct).unsqueeze(2)).reshape(B, Hq, 1, d)
    group = torch.exp(block_max(logits, block_size) - lse).amax(dim=2)  # [B, Hkv, 1, nb + 1]
    return _like_q(out, q), select_blocks(group, block_size, topk // block_size, pos)


def sparse_attention_decode(q: Tensor, k_win: Tensor, v_win: Tensor, k_shared: Tensor, v_shared: Tensor,
                            indices: Tensor, cache_len: Tensor, gate_sparse: Tensor | None, gate_swa: Tensor | None,
                            sinks: Tensor | None, block_size: int, window: int, scale: float, merge: bool,
                            backend: str = "auto") -> Tensor:
    """`hysparse::sparse_attention_decode` as plain torch (docs/design.md, Decode): the new token at t = cache_len-1.

    q [B, Hq, 1, d]; k_win/v_win [B, Hkv, W, d] the SWA ring (position p in slot p % W); k_shared/v_shared
    [B, Hkv, S, d]; indices [B, Hkv, 1, nsel]; gates [B, Hq, 1, 1|d] or None; sinks [Hq] or None -> [B, Hq, 1, d]
    """
    B, Hq, _, d = q.shape
    Hkv, S = k_shared.shape[1], k_shared.shape[2]
    ct = _compute_dtype(q.dtype)
    qg = _grouped(q.to(ct), Hkv)  # [B, Hkv, G, 1, d]
    sink = None if sinks is None else sinks.to(ct).reshape(Hkv, Hq // Hkv)
    t = (cache_len.long() - 1).reshape(B, 1)  # [B, 1]
    keys = torch.arange(S, device=q.device).unsqueeze(0)  # [1, S]
    nb = (S + block_size - 1) // block_size
    idx = indices.long()[:, :, 0]  # [B, Hkv, nsel]
    idx = torch.where((idx >= 0) & (idx < nb), idx, torch.full_like(idx, nb))  # out of range -> a dummy column
    blocks = torch.zeros(B, Hkv, nb + 1, dtype=torch.bool, device=q.device).scatter(-1, idx, True)
    key_block = torch.div(keys, block_size, rounding_mode="floor").unsqueeze(0).expand(B, Hkv, S)
    sel = torch.gather(blocks, -1, key_block) & (keys <= t).unsqueeze(1)  # [B, Hkv, S]
    sel = sel.unsqueeze(2).unsqueeze(3)  # [B, Hkv, 1, 1, S]
    logits_sh = torch.matmul(qg, k_shared.to(ct).unsqueeze(2).transpose(-1, -2)) * scale
    if merge:
        win = (keys <= t) & (keys > t - window) if window else torch.zeros_like(keys <= t)
        o, _ = softmax_with_sink(logits_sh, sel | win.reshape(B, 1, 1, 1, S), v_shared.to(ct), sink)
        return _like_q(o.reshape(B, Hq, 1, d), q)
    o_sp, _ = softmax_with_sink(logits_sh, sel, v_shared.to(ct), sink)
    out = o_sp.reshape(B, Hq, 1, d)
    out = out * gate_sparse.to(ct) if gate_sparse is not None else out
    if window:
        W = k_win.shape[2]
        slots = torch.arange(W, device=q.device).unsqueeze(0)
        p = t - torch.remainder(t - slots, W)  # position held by each slot, [B, W]
        valid = (p >= 0) & (p > t - window)
        logits_own = torch.matmul(qg, k_win.to(ct).unsqueeze(2).transpose(-1, -2)) * scale
        o_swa, _ = softmax_with_sink(logits_own, valid.reshape(B, 1, 1, 1, W), v_win.to(ct), sink)
        o_swa = o_swa.reshape(B, Hq, 1, d)
        out = out + (o_swa * gate_swa.to(ct) if gate_swa is not None else o_swa)
    return _like_q(out, q)


DECOMPOSITIONS = {
    torch.ops.hysparse.full_attention.default: full_attention,
    torch.ops.hysparse.sparse_attention.default: sparse_attention,
    torch.ops.hysparse.full_attention_decode.default: full_attention_decode,
    torch.ops.hysparse.sparse_attention_decode.default: sparse_attention_decode,
}
