"""Float64 brute-force oracle for the HySparse ops, written from SPEC §2 and the paper's equations (2), (3), (5), (7),
(9), independently of the package's code: this module never imports `hysparse_compile`.

Two forms of the same math:
- the loop oracle (`oracle_full`, `oracle_sparse`, and their `*_rows` forms for queries at any positions, which
  `oracle_*_decode` and `oracle_*_extend` wrap): one (batch, head, query row) at a time, obviously right, slow.
  Autograd flows through it (rows are stacked, sinks stay tensors), so tiny cases can check gradients too;
- the dense oracle (`dense_full`, `dense_sparse`): explicit [B, H, R, S] key masks and one softmax with the sink as
  an extra column, differentiable and fast enough for a gradient grid. tests/kernels/test_oracle.py checks it
  against the loop oracle, values and gradients.

Positions: a query row sits at a position `pos` and reads keys `0..pos` of a linear cache (key i at position i).
Prefill is `pos = t`, decode `pos = cache_len - 1`, extend `pos = start + r`.

Two options of the op parameters, written from their definitions: `softcap` (each logit l becomes
`softcap * tanh(l / softcap)` before the softmax, Gemma 2) and, on the full layer too, per-head `sinks` (a logit that
joins the softmax denominator as a key of value 0, gpt-oss); the full layer's block scores are the probabilities of
that softmax, sink included.
"""
from __future__ import annotations

import math

import torch

F64 = torch.float64


def _f64(x):
    return None if x is None else x.to(F64)


def prefill_positions(B: int, T: int) -> torch.Tensor:
    """int64 [B, T]: row t of every batch sits at position t."""
    return torch.arange(T).view(1, T).expand(B, T)


def _scale(scale, d):
    return 1 / math.sqrt(d) if scale is None else scale


# ---------------------------------------------------------------------------------------------- loop oracle
def _capped(logits, softcap):
    """Logit soft-capping: softcap * tanh(logits / softcap) (None or 0: the logits as they are)."""
    return softcap * torch.tanh(logits / softcap) if softcap else logits


def _attend(qt, keys, vals, scale, sink=None, softcap=None):
    """Softmax attention of one query [d] over key/value rows [n, d] (float64); `sink` a 0-d logit that joins the
    denominator as a key of value 0. No key: a zero output."""
    if keys.shape[0] == 0:
        return torch.zeros(vals.shape[-1], dtype=F64)
    logits = _capped((keys @ qt) * scale, softcap)
    if sink is not None:
        logits = torch.cat([logits, sink.view(1)])
    p = torch.softmax(logits, dim=0)
    return p[: keys.shape[0]] @ vals


def _long(positions) -> torch.Tensor:
    return torch.tensor(positions, dtype=torch.long)


def _expand_gate(gate, B, Hq, R):
    return None if gate is None else _f64(gate).expand(B, Hq, R, gate.shape[-1])


def oracle_full_rows(q, k, v, pos, block_size, topk, scale=None, softcap=None, sinks=None):
    """Full layer for query rows at positions `pos` over a linear cache (softcap, sinks [Hq]: module docstring).

    q [B, Hq, R, d]; k, v [B, Hkv, S, d]; pos int [B, R] -> out [B, Hq, R, d] float64, scores [B, Hq, R, nb]
    float64 (nb = ceil(S / block_size); S[t, j] = max over keys i <= pos of block j of softmax_t(q.k * scale)),
    indices int64 [B, Hkv, R, topk // block_size] (top group-max blocks among j * block_size <= pos, ties to the lower
    index, ascending, -1 padded).
    """
    q, k, v = _f64(q), _f64(k), _f64(v)
    B, Hq, R, d = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = _scale(scale, d)
    nb, nsel = math.ceil(S / block_size), topk // block_size
    outs, scores = [], torch.zeros(B, Hq, R, nb, dtype=F64)
    sinks = _f64(sinks)
    for b in range(B):
        for h in range(Hq):
            g = h // G
            for r in range(R):
                t = int(pos[b, r])
                logits = _capped((k[b, g, : t + 1] @ q[b, h, r]) * scale, softcap)  # keys 0..t
                if sinks is not None:  # the sink is one more column; its probability is dropped
                    logits = torch.cat([logits, sinks[h].view(1)])
                p = torch.softmax(logits, dim=0)[: t + 1]
                outs.append(p @ v[b, g, : t + 1])
                # max per key block; keys after t are absent (probability 0), so a future block scores 0
                scores[b, h, r] = torch.cat([p.detach(), p.new_zeros(nb * block_size - t - 1)]).view(nb, -1).amax(-1)
    indices = torch.full((B, Hkv, R, nsel), -1, dtype=torch.int64)
    for b in range(B):
        for g in range(Hkv):
            for r in range(R):
                t = int(pos[b, r])
                group = scores[b, g * G:(g + 1) * G, r].max(0).values.tolist()  # group max over the G heads
                cands = [j for j in range(nb) if j * block_size <= t]
                ranked = sorted(cands, key=lambda j: (-group[j], j))[:nsel]
                for slot, j in enumerate(sorted(ranked)):
                    indices[b, g, r, slot] = j
    return torch.stack(outs).view(B, Hq, R, d), scores, indices


def oracle_full(q, k, v, block_size, topk, scale=None, softcap=None, sinks=None):
    """Prefill: -> out [B, Hq, T, d], scores [B, Hq, T, nb] (float64), indices int64 [B, Hkv, T, nsel]."""
    return oracle_full_rows(q, k, v, prefill_positions(q.shape[0], q.shape[2]), block_size, topk, scale, softcap,
                            sinks)


def oracle_full_decode(q, k_cache, v_cache, cache_len, block_size, topk, scale=None, softcap=None, sinks=None):
    """One new token per row at position cache_len[b] - 1: q [B, Hq, 1, d] -> out, scores, indices of that row."""
    return oracle_full_rows(q, k_cache, v_cache, (cache_len.long() - 1).view(-1, 1), block_size, topk, scale,
                            softcap, sinks)


def oracle_full_extend(q, k_cache, v_cache, start, block_size, topk, scale=None, softcap=None, sinks=None):
    """R new tokens per row at positions start[b] .. start[b] + R - 1 (written in the cache already)."""
    pos = start.long().view(-1, 1) + torch.arange(q.shape[2]).view(1, -1)
    return oracle_full_rows(q, k_cache, v_cache, pos, block_size, topk, scale, softcap, sinks)


def oracle_sparse_rows(q, k_own, v_own, k_shared, v_shared, indices, pos, block_size, window, gate_sparse=None,
                       gate_swa=None, sinks=None, scale=None, merge=False, window_keys=None, softcap=None):
    """Sparse layer for query rows at positions `pos`.

    q [B, Hq, R, d]; k_own/v_own [B, Hkv, S, d] the layer's own keys (the SWA branch's, linear: key i at position
    i); k_shared/v_shared [B, Hkv, S, d]; indices [B, Hkv, R, nsel] (-1 = none); pos int [B, R]; window None = no
    SWA branch; gates broadcast to [B, Hq, R, 1|d]; sinks [Hq]. merge: one softmax over the selected and window keys
    of k_shared (k_own unread). `window_keys(b, g, positions) -> (keys, values)` overrides where the SWA branch reads
    its keys (decode's ring buffer). -> out [B, Hq, R, d] float64 (differentiable).
    """
    q, k_shared, v_shared = _f64(q), _f64(k_shared), _f64(v_shared)
    k_own, v_own = _f64(k_own), _f64(v_own)
    B, Hq, R, d = q.shape
    G = Hq // k_shared.shape[1]
    scale = _scale(scale, d)
    gs, gw = _expand_gate(gate_sparse, B, Hq, R), _expand_gate(gate_swa, B, Hq, R)
    sinks = _f64(sinks)
    if window_keys is None:
        window_keys = lambda b, g, ps: (k_own[b, g, ps], v_own[b, g, ps])  # noqa: E731
    outs = []
    for b in range(B):
        for h in range(Hq):
            g = h // G
            sink = None if sinks is None else sinks[h]
            for r in range(R):
                t = int(pos[b, r])
                blocks = {j for j in indices[b, g, r].tolist() if j >= 0}
                sel = _long([i for i in range(t + 1) if i // block_size in blocks])
                win = _long(list(range(max(0, t - window + 1), t + 1)) if window else [])
                if merge:
                    keys = _long(sorted(set(sel.tolist()) | set(win.tolist())))
                    outs.append(_attend(q[b, h, r], k_shared[b, g, keys], v_shared[b, g, keys], scale, sink, softcap))
                    continue
                o = _attend(q[b, h, r], k_shared[b, g, sel], v_shared[b, g, sel], scale, sink, softcap)
                if gs is not None:
                    o = o * gs[b, h, r]
                if window:
                    kw, vw = window_keys(b, g, win)
                    o_sw = _attend(q[b, h, r], kw, vw, scale, sink, softcap)
                    o = o + (o_sw * gw[b, h, r] if gw is not None else o_sw)
                outs.append(o)
    return torch.stack(outs).view(B, Hq, R, d)


def oracle_sparse(q, k_own, v_own, k_shared, v_shared, indices, block_size, window, gate_sparse=None, gate_swa=None,
                  sinks=None, scale=None, merge=False, softcap=None):
    """Prefill: -> out [B, Hq, T, d] float64. window None = no SWA branch. Gates broadcast to [B, Hq, T, 1|d]."""
    return oracle_sparse_rows(q, k_own, v_own, k_shared, v_shared, indices, prefill_positions(q.shape[0], q.shape[2]),
                              block_size, window, gate_sparse, gate_swa, sinks, scale, merge, softcap=softcap)


def oracle_sparse_decode(q, k_win, v_win, k_shared, v_shared, indices, cache_len, block_size, window,
                         gate_sparse=None, gate_swa=None, sinks=None, scale=None, merge=False, softcap=None):
    """One new token per row at t = cache_len[b] - 1. k_win/v_win [B, Hkv, W, d]: the SWA ring buffer, position p
    in slot p % W (read only at the window's positions); with merge the window comes from k_shared."""
    W = k_win.shape[2]
    kw, vw = _f64(k_win), _f64(v_win)
    ring = lambda b, g, ps: (kw[b, g, ps % W], vw[b, g, ps % W])  # noqa: E731
    pos = (cache_len.long() - 1).view(-1, 1)
    return oracle_sparse_rows(q, None, None, k_shared, v_shared, indices, pos, block_size, window, gate_sparse,
                              gate_swa, sinks, scale, merge, window_keys=ring, softcap=softcap)


def oracle_sparse_extend(q, k_own, v_own, k_shared, v_shared, indices, start, block_size, window, gate_sparse=None,
                         gate_swa=None, sinks=None, scale=None, merge=False, softcap=None):
    """R new tokens per row at positions start[b] + r; k_own/v_own, k_shared/v_shared linear caches [B, Hkv, S, d]."""
    pos = start.long().view(-1, 1) + torch.arange(q.shape[2]).view(1, -1)
    return oracle_sparse_rows(q, k_own, v_own, k_shared, v_shared, indices, pos, block_size, window, gate_sparse,
                              gate_swa, sinks, scale, merge, softcap=softcap)


# ---------------------------------------------------------------------------------------------- dense oracle
def _visible(pos, S):
    """bool [B, R, S]: key i at or before each row's position."""
    return torch.arange(S).view(1, 1, S) <= pos.long().unsqueeze(-1)


def _masked_attention(q, k, v, mask, scale, sinks=None, softcap=None):
    """q [B, Hq, R, d], k/v [B, Hkv, S, d], mask bool [B, Hkv, R, S], sinks [Hq] -> [B, Hq, R, d]: softmax over the
    visible keys (and the sink as one more column of value 0); rows that see nothing give 0."""
    G = q.shape[1] // k.shape[1]
    kh, vh, mh = (x.repeat_interleave(G, dim=1) for x in (k, v, mask))  # query head h reads KV head h // G
    logits = _capped(q @ kh.transpose(-1, -2) * scale, softcap).masked_fill(~mh, float("-inf"))
    if sinks is not None:
        logits = torch.cat([logits, sinks.view(1, -1, 1, 1).expand(*logits.shape[:3], 1)], dim=-1)
    seen = torch.isfinite(logits).any(-1, keepdim=True)
    p = torch.softmax(torch.where(seen, logits, torch.zeros_like(logits)), dim=-1)[..., : kh.shape[2]]
    return (p * mh) @ vh


def dense_full(q, k, v, scale=None, pos=None, softcap=None, sinks=None):
    """Causal attention (the full layer's output) of rows at `pos` (default: prefill) over keys 0..pos, float64,
    differentiable: q [B, Hq, R, d], k/v [B, Hkv, S, d] -> [B, Hq, R, d]."""
    q, k, v = _f64(q), _f64(k), _f64(v)
    pos = prefill_positions(q.shape[0], q.shape[2]) if pos is None else pos
    mask = _visible(pos, k.shape[2]).unsqueeze(1).expand(-1, k.shape[1], -1, -1)
    return _masked_attention(q, k, v, mask, _scale(scale, q.shape[-1]), _f64(sinks), softcap)


def dense_sparse(q, k_own, v_own, k_shared, v_shared, indices, block_size, window, gate_sparse=None, gate_swa=None,
                 sinks=None, scale=None, merge=False, pos=None, softcap=None):
    """The sparse layer with explicit masks, float64, differentiable in every float input (same arguments as
    `oracle_sparse_rows`; pos default: prefill)."""
    q, k_own, v_own, k_shared, v_shared = (_f64(x) for x in (q, k_own, v_own, k_shared, v_shared))
    B, Hq, R, d = q.shape
    S = k_shared.shape[2]
    scale = _scale(scale, d)
    pos = prefill_positions(B, R) if pos is None else pos.long()
    visible = _visible(pos, S).unsqueeze(1)  # [B, 1, R, S]
    nb = math.ceil(S / block_size)
    chosen = (indices.long().unsqueeze(-1) == torch.arange(nb)).any(-2)  # [B, Hkv, R, nb]; -1 matches nothing
    selected = chosen[..., torch.arange(S) // block_size] & visible  # [B, Hkv, R, S]
    near = torch.zeros_like(visible)
    if window:
        near = visible & (torch.arange(S).view(1, 1, 1, S) > pos.view(B, 1, R, 1) - window)
    sinks = _f64(sinks)
    if merge:
        return _masked_attention(q, k_shared, v_shared, selected | near, scale, sinks, softcap)
    out = _masked_attention(q, k_shared, v_shared, selected, scale, sinks, softcap)
    if gate_sparse is not None:
        out = out * _f64(gate_sparse)
    if window:
        o_sw = _masked_attention(q, k_own, v_own, near.expand_as(selected), scale, sinks, softcap)
        out = out + (o_sw * _f64(gate_swa) if gate_swa is not None else o_sw)
    return out


# ---------------------------------------------------------------------------------------------- inputs, errors
def random_selection(pos, Hkv, block_size, nsel, generator=None):
    """A random valid selection for rows at positions pos [B, R]: distinct candidate blocks (j * block_size <= pos),
    sorted ascending, -1 padded. -> int32 [B, Hkv, R, nsel]."""
    B, R = pos.shape
    idx = torch.full((B, Hkv, R, nsel), -1, dtype=torch.int32)
    for b in range(B):
        for g in range(Hkv):
            for r in range(R):
                n = int(pos[b, r]) // block_size + 1
                pick = torch.randperm(n, generator=generator)[: min(n, nsel)].sort().values
                idx[b, g, r, : len(pick)] = pick.int()
    return idx


def random_indices(B, Hkv, T, block_size, nsel, generator=None):
    """A random valid prefill selection: int32 [B, Hkv, T, nsel] (see `random_selection`)."""
    return random_selection(prefill_positions(B, T), Hkv, block_size, nsel, generator)


def rel_err(x, ref) -> float:
    """max |x - ref| / max(1, max |ref|) in float64."""
    x, ref = x.double(), ref.double()
    return ((x - ref).abs().max() / ref.abs().max().clamp_min(1.0)).item()


def max_rel_err(x, ref) -> float:
    """max |x - ref| / max |ref| in float64 (for gradients, whose scale varies); a zero `ref` asks for an exact
    zero (0.0 when x is zero too, inf otherwise). NaN anywhere gives NaN (never below a tolerance)."""
    x, ref = x.double(), ref.double()
    diff, top = (x - ref).abs().max(), ref.abs().max()
    if top == 0:
        return 0.0 if diff == 0 else float("inf")
    return (diff / top).item()
