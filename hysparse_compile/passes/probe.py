"""Prove, by evaluating the captured graph once, what each attention site computes.

On a probe batch (row 0 unpadded, row 1 left-padded when the graph takes attention_mask) the graph runs in an
`fx.Interpreter` that records each site's q/k/v and mask (or pre-softmax logits). Then, per site:
- the logits the model computes equal `scale * q . repeat_interleave(k)` where allowed — or, for a soft-capped site,
  `softcap * tanh(scale * q.k / softcap)` — so the found scale is the model's, K/V are repeated as HF's repeat_kv
  does, and no bias such as ALiBi is hidden in the mask (a bias is named: ALiBi when it is linear in the query-key
  distance, a relative position bias when it is a function of that distance, else a bias);
- V is repeated the same way;
- the set of keys each real query may see is exactly causal, or causal restricted to the last `w` keys (a sliding
  window: `w` is measured on the unpadded row and recorded on the site), and either also excludes the left pads (the
  model honours attention_mask) or ignores them;
- with sinks, the probabilities that multiply V are `softmax([logits, sink_h])` without the sink column.
Anything else stops the compile with an error that says what was found.
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
        wanted.update(n for n in (s.q, s.k, s.v, s.q_arg, s.k_arg, s.v_arg, s.mask, s.logits, s.probs, s.sinks)
                      if isinstance(n, Node))
    call = probe_inputs(state)
    placeholders = [n for n in state.gm.graph.nodes if n.op == "placeholder"]
    args = [call[n.target] for n in placeholders]
    rec = _Recorder(state.gm, wanted)
    with torch.no_grad():
        rec.run(*args)
    for s in sites:  # get_attr nodes are not run through run_node's recording in every torch version
        if isinstance(s.sinks, Node) and s.sinks not in rec.values:
            rec.values[s.sinks] = rec.fetch_attr(s.sinks.target).detach()
    return rec.values, call


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype in (torch.float32, torch.float64) else 5e-2


def _where(site) -> str:
    return f"layer {site.index} ({site.module or site.out.name})"


def _bias_kind(diff: torch.Tensor, allowed: torch.Tensor, tol: float) -> str:
    """What an additive term on the logits looks like, from row 0 (unpadded) of diff [B, H, T, T]."""
    d, a = diff[0].cpu(), allowed[0].cpu()  # [H, T, T]
    d = d - torch.diagonal(d, dim1=-2, dim2=-1)[..., :, None]  # a constant per row does not change the softmax
    T = d.shape[-1]
    t, s = torch.arange(T)[:, None], torch.arange(T)[None, :]
    dist = (t - s).expand(T, T)
    per_offset = torch.full((d.shape[0], T), float("nan"), dtype=d.dtype)
    for delta in range(T):
        on = (dist == delta) & a.expand(d.shape[0], T, T).any(0)
        if on.any():
            vals = d[:, on]
            if (vals - vals[:, :1]).abs().max() > tol * (1 + vals.abs().max()):
                return "a bias that is not a function of the query-key distance"
            per_offset[:, delta] = vals[:, 0]
    known = ~per_offset[0].isnan()
    offsets = torch.arange(T, dtype=d.dtype)[known]
    slopes = per_offset[:, known][:, 1:2] / offsets[1:2] if known.sum() > 1 else per_offset[:, :1] * 0
    if (per_offset[:, known] - slopes * offsets).abs().max() <= tol * (1 + per_offset[:, known].abs().max()):
        shown = ", ".join(f"{-float(m):.3g}" for m in slopes[:4, 0])
        return f"ALiBi: a per-head bias linear in the query-key distance (slopes {shown}{', ...' if len(slopes) > 4 else ''})"
    return "a relative position bias (a function of the query-key distance)"


def _refuse_bias(site, diff, allowed, tol, how: str):
    kind = _bias_kind(diff, allowed, tol)
    raise ValueError(f"find_attention: at {_where(site)} {how} (largest difference {diff[allowed].abs().max().item():.3g}"
                     f"): {kind}. HySparse's ops compute softmax(scale * q.k) (optionally soft-capped) over the "
                     f"selected keys and take no additive bias, so this layer is not supported (ALiBi models such as "
                     f"Bloom, MPT or Falcon with alibi=True, and relative position biases, cannot be compiled)")


def _allowed(site, vals, ref) -> torch.Tensor:
    """Bool [B|1, H|1, T, T]: which keys each query may see, as the model's graph computes it."""
    tol = _tolerance(vals[site.q].dtype)
    T = ref.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=ref.device).tril()
    if site.kind == "softmax":
        diff = vals[site.logits].double() - ref
        allowed = diff > MASKED
        if (allowed & (diff.abs() > tol * (1 + ref.abs()))).any():
            capped = f"softcap * tanh(scale * q.k / softcap) (softcap={site.softcap:g})" if site.softcap else "scale * q.k"
            _refuse_bias(site, diff, allowed, tol, f"the logits before softmax are not {capped} plus a 0/-inf mask")
        return allowed
    mask = vals.get(site.mask) if isinstance(site.mask, Node) else None
    if mask is None:
        allowed = torch.ones(T, T, dtype=torch.bool, device=ref.device)
    elif mask.dtype == torch.bool:
        allowed = mask
    else:
        allowed = mask.double() > MASKED
        if (mask.double().abs() * allowed).max() > tol:
            bias = mask.double().expand(ref.shape)
            _refuse_bias(site, bias, allowed.expand(ref.shape), tol,
                         "the attention mask adds non-zero values to allowed logits")
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


def _mismatch(site, allowed, expected, rows, window) -> str:
    diff = (allowed != expected) & rows
    b, h, t, s = (int(i) for i in diff.nonzero()[0])
    seen = "sees" if bool(allowed[b, h, t, s]) else "does not see"
    want = "should not" if seen == "sees" else "should"
    n_vis = int(allowed[b, h, t].sum())
    what = "causal" if window is None else f"causal within a sliding window of {window} keys (as measured on row 0)"
    return (f"find_attention: the mask at {_where(site)} is not {what}: in row {b}, query {t} {seen} key {s} (a {what} "
            f"mask {want}; this query sees {n_vis} keys). compile supports causal masks and sliding-window causal "
            f"masks (keys t-w+1 .. t), optionally with left padding from attention_mask; bidirectional, prefix-LM, "
            f"chunked and document masks are not supported")


def _measure_window(allowed) -> int | None:
    """The sliding window of a mask, from row 0 (never padded): how many keys its last query sees, when fewer than
    all. None when the last query sees every key (a causal mask, at this probe length)."""
    T = allowed.shape[-1]
    seen = allowed[0, :, T - 1].sum(-1)  # [H]
    w = int(seen.min())
    return w if 0 < w < T else None


def _check_sinks(site, vals, ref, allowed, rows) -> None:
    """softmax over [logits, sink_h] with the sink column dropped is what multiplies V."""
    tol = _tolerance(vals[site.q].dtype)
    sinks = vals[site.sinks].double()  # [Hq]
    B, H, T, _ = ref.shape
    logits = vals[site.logits].double().masked_fill(~allowed, float("-inf"))
    full = torch.cat([logits, sinks.view(1, H, 1, 1).expand(B, H, T, 1)], dim=-1)
    want = torch.softmax(full, dim=-1)[..., :-1]
    got = vals[site.probs].double()
    bad = ((got - want).abs() > tol) & rows
    if bad.any():
        raise ValueError(f"find_attention: at {_where(site)} the probabilities that multiply V are not softmax over "
                         f"[logits, sinks] with the sink column dropped (largest difference "
                         f"{(got - want).abs()[rows].max().item():.3g})")


def check_sites(state, sites) -> bool:
    """Check every site (see module doc) and record each one's sliding window (`site.window`). Returns True when the
    masks honour attention_mask padding."""
    vals, call = _record(state, sites)
    am = call.get("attention_mask")
    verdicts = []
    for site in sites:
        q, k, v = (vals[n].double() for n in (site.q, site.k, site.v))
        G = site.heads // site.kv_heads
        k_rep, v_rep = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)  # [B, Hq, T, d]
        _check_inputs(site, vals, q, k_rep, v_rep)
        ref = site.scale * q @ k_rep.transpose(-1, -2)  # [B, Hq, T, T]
        if site.softcap:
            ref = site.softcap * torch.tanh(ref / site.softcap)
        B, H, T, _ = ref.shape
        allowed = _allowed(site, vals, ref).expand(B, H, T, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=ref.device).tril()
        window = _measure_window(allowed)
        if window is not None:
            causal = causal & ~torch.ones(T, T, dtype=torch.bool, device=ref.device).tril(-window)
        causal = causal.expand(B, H, T, T)
        if am is None:
            rows = torch.ones(B, 1, T, 1, dtype=torch.bool, device=ref.device).expand(B, H, T, T)
            if not torch.equal(allowed, causal):
                raise ValueError(_mismatch(site, allowed, causal, rows, window))
            verdicts.append(False)
        else:
            real = am.bool().to(ref.device)  # [B, T]
            rows = real[:, None, :, None].expand(B, H, T, T)  # pad query rows are not checked
            padded = causal & real[:, None, None, :]
            if torch.equal(allowed & rows, padded & rows):
                verdicts.append(True)
            elif torch.equal(allowed & rows, causal & rows):
                verdicts.append(False)
            else:
                raise ValueError(_mismatch(site, allowed, padded, rows, window))
        if site.sinks is not None:
            _check_sinks(site, vals, ref, allowed, rows)
        site.window, site.window_source = (window, "probe") if window is not None else (None, None)
    if len(set(verdicts)) > 1:
        raise ValueError("find_attention: some attention layers mask left padding from attention_mask and others "
                         f"do not ({verdicts}); compile needs one behaviour for the whole model")
    return bool(verdicts and verdicts[0])
