"""Float64 brute-force oracle for the HySparse ops: loops over every (batch, head, token), obviously right, slow.

Written from SPEC §2 and the paper's equations (2), (3), (5), (7), (9), independently of the package's code.
"""
from __future__ import annotations

import math

import torch


def _softmax_out(qt, keys, vals, scale, sink=None):
    """Softmax attention of one query over the given key/value rows (float64), sink logit in the denominator."""
    if keys.shape[0] == 0:
        return torch.zeros(vals.shape[-1], dtype=torch.float64)
    logits = (keys @ qt) * scale
    m = logits.max()
    if sink is not None:
        m = max(m, sink)
    e = torch.exp(logits - m)
    denom = e.sum() + (math.exp(sink - m) if sink is not None else 0.0)
    return (e[:, None] * vals).sum(0) / denom


def oracle_full(q, k, v, block_size, topk, scale=None):
    """-> out [B,Hq,T,d], scores [B,Hq,T,nb], indices [B,Hkv,T,nsel] (all float64 / int64 lists as tensors)."""
    q, k, v = q.double(), k.double(), v.double()
    B, Hq, T, d = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    scale = 1 / math.sqrt(d) if scale is None else scale
    nb, nsel = math.ceil(T / block_size), topk // block_size
    out = torch.zeros(B, Hq, T, d, dtype=torch.float64)
    scores = torch.zeros(B, Hq, T, nb, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            g = h // G
            for t in range(T):
                logits = (k[b, g, : t + 1] @ q[b, h, t]) * scale
                p = torch.softmax(logits, dim=0)
                out[b, h, t] = p @ v[b, g, : t + 1]
                for j in range(nb):
                    lo, hi = j * block_size, min(t + 1, (j + 1) * block_size)
                    if lo < hi:
                        scores[b, h, t, j] = p[lo:hi].max()
    indices = torch.full((B, Hkv, T, nsel), -1, dtype=torch.int64)
    for b in range(B):
        for g in range(Hkv):
            for t in range(T):
                group = scores[b, g * G:(g + 1) * G, t].max(0).values
                cands = [j for j in range(nb) if j * block_size <= t]
                ranked = sorted(cands, key=lambda j: (-group[j].item(), j))[:nsel]
                for slot, j in enumerate(sorted(ranked)):
                    indices[b, g, t, slot] = j
    return out, scores, indices


def oracle_sparse(q, k_own, v_own, k_shared, v_shared, indices, block_size, window, gate_sparse=None, gate_swa=None,
                  sinks=None, scale=None, merge=False):
    """-> out [B,Hq,T,d] float64. window None = no SWA branch. Gates broadcast to [B,Hq,T,1|d]."""
    q = q.double()
    k_own, v_own, k_shared, v_shared = (x.double() for x in (k_own, v_own, k_shared, v_shared))
    B, Hq, T, d = q.shape
    Hkv = k_shared.shape[1]
    G = Hq // Hkv
    scale = 1 / math.sqrt(d) if scale is None else scale
    gs = None if gate_sparse is None else gate_sparse.double().expand(B, Hq, T, gate_sparse.shape[-1])
    gw = None if gate_swa is None else gate_swa.double().expand(B, Hq, T, gate_swa.shape[-1])
    out = torch.zeros(B, Hq, T, d, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            g = h // G
            sink = None if sinks is None else float(sinks[h])
            for t in range(T):
                blocks = {int(j) for j in indices[b, g, t] if int(j) >= 0}
                sel = [i for i in range(t + 1) if i // block_size in blocks]
                win = list(range(max(0, t - window + 1), t + 1)) if window else []
                if merge:
                    keys = sorted(set(sel) | set(win))
                    out[b, h, t] = _softmax_out(q[b, h, t], k_shared[b, g, keys], v_shared[b, g, keys], scale, sink)
                    continue
                o_sp = _softmax_out(q[b, h, t], k_shared[b, g, sel], v_shared[b, g, sel], scale, sink)
                o = o_sp * (gs[b, h, t] if gs is not None else 1.0)
                if window:
                    o_sw = _softmax_out(q[b, h, t], k_own[b, g, win], v_own[b, g, win], scale, sink)
                    o = o + o_sw * (gw[b, h, t] if gw is not None else 1.0)
                out[b, h, t] = o
    return out


def random_indices(B, Hkv, T, block_size, nsel, generator=None):
    """A random valid selection: distinct candidate blocks (j * block_size <= t), sorted ascending, -1 padded."""
    idx = torch.full((B, Hkv, T, nsel), -1, dtype=torch.int32)
    for b in range(B):
        for g in range(Hkv):
            for t in range(T):
                n = t // block_size + 1
                pick = torch.randperm(n, generator=generator)[: min(n, nsel)].sort().values
                idx[b, g, t, : len(pick)] = pick.int()
    return idx


def rel_err(x, ref) -> float:
    """max |x - ref| / max(1, max |ref|) in float64."""
    x, ref = x.double(), ref.double()
    return ((x - ref).abs().max() / ref.abs().max().clamp_min(1.0)).item()
