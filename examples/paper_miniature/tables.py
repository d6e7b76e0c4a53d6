"""The result tables of docs/fidelity.md, filled from evaluate.py's results.json (markdown).

    python examples/paper_miniature/tables.py results.json > results.md
"""
from __future__ import annotations

import json
import sys

MAIN = ("full", "swa-1:3", "hysparse-1:3", "swa-1:7", "hysparse-1:7")
ABLATIONS = ("full", "swa-1:3", "kv-none", "no-swa", "kv-both", "hysparse-1:3")
ABLATION_LABEL = {"full": "Full-Attn", "swa-1:3": "Hybrid SWA", "kv-none": "w/o KV sharing (own K/V), w/ SWA",
                  "no-swa": "KV sharing, w/o intra-layer SWA", "kv-both": "sharing for SA & SWA",
                  "hysparse-1:3": "sharing only for SA (HySparse)"}


def fmt(s, digits: int = 3, scale: float = 1.0) -> str:
    """'mean' or 'mean ± half-range' over seeds; '–' when missing."""
    if s is None:
        return "–"
    if isinstance(s, (int, float)):
        return f"{s * scale:.{digits}f}"
    mean = f"{s['mean'] * scale:.{digits}f}"
    if s["n"] > 1:
        return f"{mean} ± {(s['max'] - s['min']) * scale / 2:.{digits}f}"
    return mean


def _mib(b) -> str:
    return "–" if b is None else f"{b / 2**20:.2f}"


def _bucket_names(buckets) -> list[str]:
    def short(n):
        return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)
    return [f"{short(a)}–{short(b)}" for a, b in buckets]


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(header, rows) -> list[str]:
    return [_row(header), _row(["---"] * len(header)), *[_row(r) for r in rows]]


def _tf_row(label: str, pattern: str, ev: dict, n_depths: int) -> list:
    mk = ev["retrieval"].get("multikey")
    return [label, pattern, f"{ev['val_loss']:.4f}", *[f"{b:.3f}" for b in ev["loss_by_bucket"]],
            f"{sum(ev['retrieval']['single']['acc']) / n_depths:.2f}",
            "–" if mk is None else f"{sum(mk['acc']) / n_depths:.2f}"]


def markdown(results: dict) -> str:
    st, agg = results["settings"], results["variants"]
    buckets = _bucket_names(st["buckets"])
    depths = st["depths"]
    lines = [f"Context {st['context']}, {st['eval_seqs']} held-out windows, {st['probe_samples']} probes per depth; "
             "values are the mean over seeds ± half the min–max range when there are several.", ""]

    lines += ["**Main comparison** (held-out loss in nats/byte; retrieval = value-byte accuracy, mean over depths)", ""]
    rows = []
    for v in MAIN:
        if v in agg:
            a = agg[v]
            rows.append([f"`{v}`", f"`{a['pattern']}`", len(a["seeds"]), f"{a['tokens'] / 1e6:.1f}M",
                         fmt(a["val_loss"], 4), *[fmt(b) for b in a["loss_by_bucket"]],
                         fmt(a["retrieval"]["single"]["mean_acc"], 2),
                         fmt(a["retrieval"].get("multikey", {}).get("mean_acc"), 2)])
    lines += _table(["variant", "layers", "seeds", "tokens", "val loss", *buckets, "retrieval", "multi-key"], rows)

    for kind, title in (("single", "Needle retrieval by depth"), ("multikey", "Multi-key retrieval by depth")):
        rows, dist = [], None
        for v in (*MAIN, *[a for a in ABLATIONS if a not in MAIN]):
            if v in agg and kind in agg[v]["retrieval"]:
                r = agg[v]["retrieval"][kind]
                dist = r["distance"]
                rows.append([f"`{v}`", *[fmt(x, 2) for x in r["acc"]], fmt(r["mean_acc"], 2)])
        if rows:
            head = [f"{d:g} ({int(x)})" for d, x in zip(depths, dist)]
            lines += ["", f"**{title}** (depth (bytes from needle to value); value-byte accuracy)", ""]
            lines += _table(["variant", *head, "mean"], rows)

    rows = []
    for v in ABLATIONS:
        if v in agg:
            a = agg[v]
            rows.append([f"`{v}`", ABLATION_LABEL[v], fmt(a["val_loss"], 4), fmt(a["loss_by_bucket"][-1]),
                         fmt(a["retrieval"]["single"]["mean_acc"], 2),
                         fmt(a["retrieval"].get("multikey", {}).get("mean_acc"), 2), _mib(a["kv_bytes"])])
    lines += ["", "**Ablations at 1:3** (paper Table 4)", ""]
    lines += _table(["variant", "paper row", "val loss", f"loss {buckets[-1]}", "retrieval", "multi-key",
                     "KV MiB"], rows)

    rows = []
    full_kv = agg.get("full", {}).get("kv_bytes")
    order = [*MAIN, *[v for v in ABLATIONS if v not in MAIN]]
    for v, a in sorted(agg.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order)):
        ratio = f"{full_kv / a['kv_bytes']:.2f}×" if full_kv and a["kv_bytes"] else "–"
        tok_s = None if a["ms_per_step"] is None else a["tokens"] / a["steps"] / a["ms_per_step"]["mean"] * 1e3
        rows.append([f"`{v}`", _mib(a["kv_bytes"]), ratio, fmt(a["ms_per_step"], 1),
                     "–" if tok_s is None else f"{tok_s / 1e3:.0f}k", fmt(a["decode_tok_s"], 1),
                     fmt(a["decode_tok_s_plain"], 1)])
    lines += ["", f"**Efficiency** (KV cache at {st['context']} tokens, batch 1, bf16; training step time; cached "
              "greedy decoding, batch 1)", ""]
    lines += _table(["variant", "KV MiB", "less than full", "train ms/step", "train tok/s", "decode tok/s "
                     "(hs.generate)", "decode tok/s (plain cache)"], rows)

    tf = results.get("training_free")
    if tf:
        src = results["runs"][tf["source_run"]]["eval"]
        rows = [_tf_row(f"trained `{tf['source_run']}`", "–", src, len(depths))]
        rows += [_tf_row(f"top-k {r['topk']}", f"`{r['pattern']}`", r, len(depths)) for r in tf["rows"]]
        lines += ["", f"**Training-free** (`{tf['source_run']}` compiled with mode=\"training_free\", 1:{tf['ratio']}, "
                  f"window {tf['window']}, no training)", ""]
        lines += _table(["model", "layers", "val loss", *buckets, "retrieval", "multi-key"], rows)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        sys.stdout.write(markdown(json.load(f)))
