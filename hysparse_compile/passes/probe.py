"""Prove, by evaluating the captured graph once, what each attention site computes.

On a probe batch (row 0 unpadded, row 1 left-padded when the graph takes attention_mask) the graph runs in an
`fx.Interpreter` that records each site's q/k/v and mask (or pre-softmax logits). Then, per site:
- the logits the model computes equal `scale * q . repeat_interleave(k)` where allowed (so the found scale is the
  model's, K/V are repeated as HF's repeat_kv does, and no bias such as ALiBi or softcapping is hidden in the mask);
- V is repeated the same way;
- the set of keys each real query may see is exactly causal, and either also excludes the left pads (the model
  honours attention_mask) or ignores them.
Anything else stops the compile with an error that says what mask was found.
"""
from __future__ import annotations

import torch
from torch.fx import Interpreter, Node

MASKED = -1e3  # a logit this far below q.k * scale counts as masked (additive masks use -inf or dtype min)


class _Recorder(Interpreter):
    def __init__(self, gm, wanted: set):
        super().__init__(gm)
        self.wanted, self.values = wanted, {}

    def run_node(self, n):
        out = super().run_node(n)
        if n in self.wanted and isinstance(out, torch.Tensor):
            self.values[n] = out.detach()
        return out


def probe_inputs(state) -> dict:
    """Inputs of the probe run: the example's first two rows; row 1 left-padded when there is an attention_mask."""
    call = dict(state.call_inputs)
    ids = call[state.token_name][:2]
    B, T = ids.shape
    call[state.token_name] = ids
    if "attention_mask" in call:
        mask = torch.ones_like(ids)
        mask[1, : max(1, T // 4)] = 0  # [B, T] row 1 left-padded
        call["attention_mask"] = mask
    if "position_ids" in call:
        call["position_ids"] = torch.arange(T, device=ids.device).expand(B, T).clone()
    return call


def _record(state, sites) -> tuple[dict, dict]:
    wanted = set()
    for s in sites:
        wanted.update(n for n in (s.q, s.k, s.v, s.q_arg, s.k_arg, s.v_arg, s.mask, s.logits) if isinstance(n, Node))
    call = probe_inputs(state)
    placeholders = [n for n in state.gm.graph.nodes if n.op == "placeholder"]
    args = [call[n.target] for n in placeholders]
    rec = _Recorder(state.gm, wanted)
    with torch.no_grad():
        rec.run(*args)
    return rec.values, call


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype in (torch.float32, torch.float64) else 5e-2


def _where(site) -> str:
    return f"layer {site.index} ({site.module or site.out.name})"


def _allowed(site, vals, ref) -> torch.Tensor:
    """Bool [B|1, H|1, T, T]: which keys each query may see, as the model's graph computes it."""
    tol = _tolerance(vals[site.q].dtype)
    T = ref.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=ref.device).tril()
    if site.kind == "softmax":
        diff = vals[site.logits].double() - ref
        allowed = diff > MASKED
        bad = allowed & (diff.abs() > tol * (1 + ref.abs()))
        if bad.any():
            raise ValueError(f"find_attention: at {_where(site)} the logits before softmax are not scale * q.k plus a "
                             f"0/-inf mask (largest difference {diff[allowed].abs().max().item():.3g}): a bias, "
                             f"softcapping or another transform sits between q @ k^T and softmax")
        return allowed
    mask = vals.get(site.mask) if isinstance(site.mask, Node) else None
    if mask is None:
        allowed = torch.ones(T, T, dtype=torch.bool, device=ref.device)
    elif mask.dtype == torch.bool:
        allowed = mask
    else:
        allowed = mask.double() > MASKED
        if (mask.double().abs() * allowed).max() > tol:
            raise ValueError(f"find_attention: at {_where(site)} the attention mask adds non-zero values to allowed "
                             f"logits (max {(mask.double().abs() * allowed).max().item():.3g}): a position bias such "
                             f"as ALiBi is not supported")
    return allowed & causal if site.is_causal else allowed


def _check_inputs(site, vals, q, k_rep, v_rep) -> None:
    tol = _tolerance(vals[site.q].dtype)
    qa, ka, va = (vals[n].double() for n in (site.q_arg, site.k_arg, site.v_arg))
    if site.kind == "sdpa":
        if ka.shape[1] != site.heads:  # enable_gqa=True: sdpa repeats internally (repeat_interleave)
            ka = ka.repeat_interleave(site.heads // ka.shape[1], 1)
            va = va.repeat_interleave(site.heads // va.shape[1], 1)
        ka = ka.transpose(-1, -2)
    got = site.arg_scale * qa @ ka  # [B, Hq, T, T]
    want = site.scale * q @ k_rep.transpose(-1, -2)
    if (got - want).abs().max() > tol * (1 + want.abs().max()):
        G = site.heads // site.kv_heads
        raise ValueError(f"find_attention: at {_where(site)} the attention scores are not scale * q . k with K/V "
                         f"heads repeated as repeat_interleave (query head h reads KV head h // {G}); the model "
                         f"repeats or scales K/V in a layout HySparse does not follow")
    if (va.expand_as(v_rep) - v_rep).abs().max() > tol * (1 + v_rep.abs().max()):
        raise ValueError(f"find_attention: at {_where(site)} V heads are repeated in a layout other than "
                         f"repeat_interleave (query head h reads KV head h // G)")


def _mismatch(site, allowed, expected, rows) -> str:
    diff = (allowed != expected) & rows
    b, h, t, s = (int(i) for i in diff.nonzero()[0])
    seen = "sees" if bool(allowed[b, h, t, s]) else "does not see"
    want = "should not" if seen == "sees" else "should"
    n_vis = int(allowed[b, h, t].sum())
    return (f"find_attention: the mask at {_where(site)} is not causal: in row {b}, query {t} {seen} key {s} (a causal "
            f"mask {want}; this query sees {n_vis} keys). compile supports causal masks, optionally with left padding "
            f"from attention_mask; sliding-window, bidirectional, prefix-LM and document masks are not supported")


def check_sites(state, sites) -> bool:
    """Check every site (see module doc). Returns True when the masks honour attention_mask padding."""
    vals, call = _record(state, sites)
    am = call.get("attention_mask")
    verdicts = []
    for site in sites:
        q, k, v = (vals[n].double() for n in (site.q, site.k, site.v))
        G = site.heads // site.kv_heads
        k_rep, v_rep = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)  # [B, Hq, T, d]
        _check_inputs(site, vals, q, k_rep, v_rep)
        ref = site.scale * q @ k_rep.transpose(-1, -2)  # [B, Hq, T, T]
        B, H, T, _ = ref.shape
        allowed = _allowed(site, vals, ref).expand(B, H, T, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=ref.device).tril().expand(B, H, T, T)
        if am is None:
            rows = torch.ones(B, 1, T, 1, dtype=torch.bool, device=ref.device).expand(B, H, T, T)
            if not torch.equal(allowed, causal):
                raise ValueError(_mismatch(site, allowed, causal, rows))
            verdicts.append(False)
            continue
        real = am.bool().to(ref.device)  # [B, T]
        rows = real[:, None, :, None].expand(B, H, T, T)  # pad query rows are not checked
        padded = causal & real[:, None, None, :]
        if torch.equal(allowed & rows, padded & rows):
            verdicts.append(True)
        elif torch.equal(allowed & rows, causal & rows):
            verdicts.append(False)
        else:
            raise ValueError(_mismatch(site, allowed, padded, rows))
    if len(set(verdicts)) > 1:
        raise ValueError("find_attention: some attention layers mask left padding from attention_mask and others "
                         f"do not ({verdicts}); compile needs one behaviour for the whole model")
    return bool(verdicts and verdicts[0])
