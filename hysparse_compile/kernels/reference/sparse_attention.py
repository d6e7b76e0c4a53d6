"""Reference sparse layer: sparse branch over the shared K/V at the selected blocks, SWA branch over the layer's own
K/V, per-head sinks in each denominator, gates on the outputs (SPEC §2.2); `merge=True` is SPEC §2.4.

Queries are processed in chunks; each chunk builds its key masks from the indices (a block-level mask expanded to
keys) and runs a masked softmax. The backward recomputes each chunk and applies the softmax gradient analytically
(the custom ops run below autograd, so the reference cannot lean on it).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .full_attention import _grouped, compute_dtype, query_chunks


def block_key_mask(indices: Tensor, S: int, block_size: int) -> Tensor:
    """Keys 0..S-1 inside each row's selected blocks (no causality): indices int32 [B, Hkv, C, nsel] (-1 = none)
    -> bool [B, Hkv, C, S]."""
    B, Hkv, C, _ = indices.shape
    nb = -(-S // block_size)
    idx = indices.long()
    idx = torch.where((idx >= 0) & (idx < nb), idx, torch.full_like(idx, nb))  # out of range -> dummy column
    blocks = torch.zeros(B, Hkv, C, nb + 1, dtype=torch.bool, device=indices.device).scatter_(-1, idx, True)
    return blocks[..., torch.arange(S, device=indices.device) // block_size]


def selected_key_mask(indices: Tensor, t0: int, t1: int, block_size: int) -> Tensor:
    """Which keys 0..t1-1 each query row t0..t1-1 may read in the sparse branch (selected and causal).

    indices: int32 [B, Hkv, C, nsel] (-1 = none) -> bool [B, Hkv, 1, C, t1]
    """
    C = indices.shape[2]
    keys = torch.arange(t1, device=indices.device)
    mask = block_key_mask(indices, t1, block_size)  # [B, Hkv, C, t1]
    causal = keys.view(1, t1) <= torch.arange(t0, t1, device=indices.device).view(C, 1)
    return (mask & causal).unsqueeze(2)


def window_key_mask(t0: int, t1: int, k0: int, window: int, device) -> Tensor:
    """Keys k0..t1-1 inside each row's window (t - window, t]: bool [C, t1 - k0]."""
    keys = torch.arange(k0, t1, device=device).view(1, -1)
    rows = torch.arange(t0, t1, device=device).view(-1, 1)
    return (keys <= rows) & (keys > rows - window)


def masked_probs(logits: Tensor, mask: Tensor, sink: Tensor | None):
    """Softmax over the visible keys with an optional sink logit in the denominator.

    logits [B, Hkv, G, C, K], mask broadcastable to it, sink [Hkv, G] or None -> p [B, Hkv, G, C, K] (0 off the
    mask), p_sink [B, Hkv, G, C, 1] (the sink's share of the denominator) or None, lse of the keys alone
    [B, Hkv, G, C] (-inf where no key is visible).
    """
    s = logits.masked_fill(~mask, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    sink_b = None if sink is None else sink.view(1, *sink.shape, 1, 1).to(s.dtype)
    if sink_b is not None:
        m = torch.maximum(m, sink_b)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    keys_sum = e.sum(-1, keepdim=True)
    sink_e = None if sink_b is None else torch.exp(sink_b - m)
    denom = keys_sum if sink_e is None else keys_sum + sink_e
    denom = torch.where(denom > 0, denom, torch.ones_like(denom))
    return e / denom, None if sink_e is None else sink_e / denom, (torch.log(keys_sum) + m).squeeze(-1)


def softmax_with_sink(logits: Tensor, mask: Tensor, v: Tensor, sink: Tensor | None):
    """Masked softmax attention with an optional sink logit in the denominator.

    logits [B, Hkv, G, C, K], mask broadcastable to it, v [B, Hkv, K, d], sink [Hkv, G] or None
    -> out [B, Hkv, G, C, d], lse of the keys alone [B, Hkv, G, C] (-inf where no key)
    """
    p, _, lse = masked_probs(logits, mask, sink)
    return torch.einsum("bhgck,bhkd->bhgcd", p, v), lse


def softmax_with_sink_bwd(logits: Tensor, mask: Tensor, v: Tensor, sink: Tensor | None, dout: Tensor):
    """Backward of `softmax_with_sink` given dL/dout [B, Hkv, G, C, d].

    Returns out, dlogits [B, Hkv, G, C, K] (already zero off the mask), dv [B, Hkv, K, d] (summed over G),
    dsink [Hkv, G] or None. With p the key probabilities and p_sink the sink's share of the denominator:
    dlogits = p * (dout.v - delta), dsink = -sum(p_sink * delta), delta = rowsum(dout * out).
    """
    p, p_sink, _ = masked_probs(logits, mask, sink)
    out = torch.einsum("bhgck,bhkd->bhgcd", p, v)
    delta = (dout * out).sum(-1, keepdim=True)  # [B, Hkv, G, C, 1]
    dlogits = p * (torch.einsum("bhgcd,bhkd->bhgck", dout, v) - delta)
    dv = torch.einsum("bhgck,bhgcd->bhkd", p, dout)
    dsink = None if p_sink is None else (-p_sink * delta).sum(dim=(0, 3, 4))
    return out, dlogits, dv, dsink


def _chunk_forward(q, k_own, v_own, k_sh, v_sh, idx, g_sp, g_swa, sinks, t0, block_size, window, scale, merge):
    """One query chunk; every tensor already in the compute dtype and cut to this chunk's rows.

    q [B, Hq, C, d]; k_sh/v_sh [B, Hkv, t1, d]; k_own/v_own [B, Hkv, t1 - k0, d] (keys k0..t1-1);
    idx [B, Hkv, C, nsel]; gates [B, Hq, C, 1|d] or None; sinks [Hq] or None.
    -> out [B, Hq, C, d], lse [B, Hq, C, 2], branches (o_sparse, o_swa) each [B, Hq, C, d] or None
    """
    B, Hq, C, d = q.shape
    Hkv, t1 = k_sh.shape[1], k_sh.shape[2]
    G = Hq // Hkv
    qg = _grouped(q, Hkv)
    sink = sinks.view(Hkv, G) if sinks is not None else None
    sel = selected_key_mask(idx, t0, t1, block_size)  # [B, Hkv, 1, C, t1]
    logits_sh = torch.einsum("bhgcd,bhkd->bhgck", qg, k_sh) * scale
    neg_inf = torch.full((B, Hq, C), float("-inf"), dtype=q.dtype, device=q.device)
    if merge:
        win = window_key_mask(t0, t1, 0, window, q.device) if window else torch.zeros_like(sel[0, 0, 0])
        o, lse = softmax_with_sink(logits_sh, sel | win, v_sh, sink)
        o = o.reshape(B, Hq, C, d)
        return o, torch.stack([lse.reshape(B, Hq, C), neg_inf], -1), (o, None)
    o_sp, lse_sp = softmax_with_sink(logits_sh, sel, v_sh, sink)
    o_sp = o_sp.reshape(B, Hq, C, d)
    out = o_sp * g_sp if g_sp is not None else o_sp
    lse_swa, o_swa = neg_inf, None
    if window:
        k0 = t1 - k_own.shape[2]
        logits_own = torch.einsum("bhgcd,bhkd->bhgck", qg, k_own) * scale
        o_swa, lse_swa = softmax_with_sink(logits_own, window_key_mask(t0, t1, k0, window, q.device), v_own, sink)
        o_swa = o_swa.reshape(B, Hq, C, d)
        out = out + (o_swa * g_swa if g_swa is not None else o_swa)
        lse_swa = lse_swa.reshape(B, Hq, C)
    return out, torch.stack([lse_sp.reshape(B, Hq, C), lse_swa], -1), (o_sp, o_swa)


def _chunk_inputs(q, k_own, v_own, k_shared, v_shared, indices, gate_sparse, gate_swa, t0, t1, window, ct):
    k0 = max(0, t0 - window + 1) if window else t1
    rows = slice(t0, t1)
    cut = lambda g: None if g is None else g[:, :, rows].to(ct)  # noqa: E731
    return (q[:, :, rows].to(ct), k_own[:, :, k0:t1].to(ct), v_own[:, :, k0:t1].to(ct),
            k_shared[:, :, :t1].to(ct), v_shared[:, :, :t1].to(ct), indices[:, :, rows],
            cut(gate_sparse), cut(gate_swa))


def sparse_attention_fwd(q, k_own, v_own, k_shared, v_shared, indices, gate_sparse, gate_swa, sinks,
                         block_size, window, scale, merge, save_branches):
    """See docs/design.md. Returns out [B, Hq, T, d], lse float32 [B, Hq, T, 2], branch_out [2, B, Hq, T, d]
    (ungated sparse/merged and SWA outputs; empty unless save_branches)."""
    B, Hq, T, d = q.shape
    ct = compute_dtype(q.dtype)
    out = torch.empty_like(q)
    lse = torch.empty(B, Hq, T, 2, dtype=torch.float32, device=q.device)
    branch_out = q.new_zeros((2, B, Hq, T, d)) if save_branches else q.new_empty(0)
    sk = None if sinks is None else sinks.to(ct)
    with torch.no_grad():
        for t0, t1 in query_chunks(B, Hq, T):
            ins = _chunk_inputs(q, k_own, v_own, k_shared, v_shared, indices, gate_sparse, gate_swa, t0, t1,
                                window, ct)
            o, l, branches = _chunk_forward(*ins, sk, t0, block_size, window, scale, merge)
            out[:, :, t0:t1] = o.to(q.dtype)
            lse[:, :, t0:t1] = l.float()
            for i, b in enumerate(branches if save_branches else ()):
                if b is not None:
                    branch_out[i, :, :, t0:t1] = b.to(q.dtype)
    return out, lse, branch_out


def _branch_grads(qg, k, v, mask, sink, dout_g, scale):
    """Gradients of one branch: returns out, dq [B, Hkv, G, C, d], dk, dv [B, Hkv, K, d], dsink."""
    logits = torch.einsum("bhgcd,bhkd->bhgck", qg, k) * scale
    out, dlogits, dv, dsink = softmax_with_sink_bwd(logits, mask, v, sink, dout_g)
    dq = torch.einsum("bhgck,bhkd->bhgcd", dlogits, k) * scale
    dk = torch.einsum("bhgck,bhgcd->bhkd", dlogits, qg) * scale
    return out, dq, dk, dv, dsink


def _reduce_gate(grad: Tensor, gate: Tensor) -> Tensor:
    """dL/dgate for a gate of shape [B, Hq, C, 1] or [B, Hq, C, d] from the per-channel product grad."""
    return grad.sum(-1, keepdim=True) if gate.shape[-1] == 1 and grad.shape[-1] != 1 else grad


def sparse_attention_bwd(dout, q, k_own, v_own, k_shared, v_shared, indices, gate_sparse, gate_swa, sinks,
                         out, lse, branch_out, block_size, window, scale, merge):
    """Gradients for every differentiable input (None for absent gates/sinks), chunk by chunk, analytically."""
    B, Hq, T, d = q.shape
    Hkv = k_shared.shape[1]
    G = Hq // Hkv
    ct = compute_dtype(q.dtype)
    acc = lambda t: None if t is None else torch.zeros(t.shape, dtype=ct, device=t.device)  # noqa: E731
    dq = torch.empty_like(q)
    dk_own, dv_own, dk_sh, dv_sh = acc(k_own), acc(v_own), acc(k_shared), acc(v_shared)
    dg_sp, dg_swa, dsinks = acc(gate_sparse), acc(gate_swa), acc(sinks)
    sink = None if sinks is None else sinks.to(ct).view(Hkv, G)
    grouped = lambda x: None if x is None else _grouped(x, Hkv)  # noqa: E731
    with torch.no_grad():
        for t0, t1 in query_chunks(B, Hq, T):
            qc, ko, vo, ks, vs, idx, gs, gw = _chunk_inputs(q, k_own, v_own, k_shared, v_shared, indices,
                                                            gate_sparse, gate_swa, t0, t1, window, ct)
            k0, C = t1 - ko.shape[2], t1 - t0
            qg, do = _grouped(qc, Hkv), _grouped(dout[:, :, t0:t1].to(ct), Hkv)
            sel = selected_key_mask(idx, t0, t1, block_size)
            if merge:
                win = window_key_mask(t0, t1, 0, window, q.device) if window else torch.zeros_like(sel[0, 0, 0])
                _, gq, gk, gv, gsink = _branch_grads(qg, ks, vs, sel | win, sink, do, scale)
                dk_sh[:, :, :t1] += gk
                dv_sh[:, :, :t1] += gv
            else:
                do_sp = do * grouped(gs) if gs is not None else do
                o_sp, gq, gk, gv, gsink = _branch_grads(qg, ks, vs, sel, sink, do_sp, scale)
                dk_sh[:, :, :t1] += gk
                dv_sh[:, :, :t1] += gv
                if gs is not None:
                    dg_sp[:, :, t0:t1] = _reduce_gate((do * o_sp).reshape(B, Hq, C, d), gs)
                if window:
                    do_sw = do * grouped(gw) if gw is not None else do
                    win = window_key_mask(t0, t1, k0, window, q.device)
                    o_sw, gq2, gk2, gv2, gsink2 = _branch_grads(qg, ko, vo, win, sink, do_sw, scale)
                    gq = gq + gq2
                    gsink = None if gsink is None else gsink + gsink2
                    dk_own[:, :, k0:t1] += gk2
                    dv_own[:, :, k0:t1] += gv2
                    if gw is not None:
                        dg_swa[:, :, t0:t1] = _reduce_gate((do * o_sw).reshape(B, Hq, C, d), gw)
            dq[:, :, t0:t1] = gq.reshape(B, Hq, C, d).to(q.dtype)
            if gsink is not None:
                dsinks += gsink.reshape(Hq)
    cast = lambda a, like: None if a is None else a.to(like.dtype)  # noqa: E731
    return (dq, cast(dk_own, k_own), cast(dv_own, v_own), cast(dk_sh, k_shared), cast(dv_sh, v_shared),
            cast(dg_sp, gate_sparse), cast(dg_swa, gate_swa), cast(dsinks, sinks))


def sparse_attention_decode(q, k_win, v_win, k_shared, v_shared, indices, cache_len, gate_sparse, gate_swa, sinks,
                            block_size, window, scale, merge):
    """One new token per sequence at position t = cache_len - 1 (see docs/design.md, Decode).

    q [B, Hq, 1, d]; k_win/v_win [B, Hkv, W, d] ring buffer (slot p % W); k_shared/v_shared [B, Hkv, S, d];
    indices [B, Hkv, 1, nsel]; gates [B, Hq, 1, 1|d] or None; sinks [Hq] or None -> out [B, Hq, 1, d]
    """
    B, Hq, _, d = q.shape
    Hkv, S = k_shared.shape[1], k_shared.shape[2]
    G = Hq // Hkv
    ct = compute_dtype(q.dtype)
    qg = _grouped(q.to(ct), Hkv)  # [B, Hkv, G, 1, d]
    sink = sinks.to(ct).view(Hkv, G) if sinks is not None else None
    t = cache_len.to(q.device).long() - 1  # [B]
    keys = torch.arange(S, device=q.device)
    sel = block_key_mask(indices, S, block_size)[:, :, 0] & (keys.view(1, 1, S) <= t.view(B, 1, 1))  # [B, Hkv, S]
    sel = sel.view(B, Hkv, 1, 1, S)
    logits_sh = torch.einsum("bhgcd,bhkd->bhgck", qg, k_shared.to(ct)) * scale
    if merge:
        win = (keys.view(1, S) <= t.view(B, 1)) & (keys.view(1, S) > t.view(B, 1) - (window or 0))
        o, _ = softmax_with_sink(logits_sh, sel | win.view(B, 1, 1, 1, S), v_shared.to(ct), sink)
        return o.reshape(B, Hq, 1, d).to(q.dtype)
    o_sp, _ = softmax_with_sink(logits_sh, sel, v_shared.to(ct), sink)
    out = o_sp.reshape(B, Hq, 1, d)
    out = out * gate_sparse.to(ct) if gate_sparse is not None else out
    if window:
        W = k_win.shape[2]
        slots = torch.arange(W, device=q.device).view(1, W)
        p = t.view(B, 1) - torch.remainder(t.view(B, 1) - slots, W)  # position held by each slot, [B, W]
        valid = (p >= 0) & (p > t.view(B, 1) - window)
        logits_own = torch.einsum("bhgcd,bhkd->bhgck", qg, k_win.to(ct)) * scale
        o_swa, _ = softmax_with_sink(logits_own, valid.view(B, 1, 1, 1, W), v_win.to(ct), sink)
        o_swa = o_swa.reshape(B, Hq, 1, d)
        out = out + (o_swa * gate_swa.to(ct) if gate_swa is not None else o_swa)
    return out.to(q.dtype)
