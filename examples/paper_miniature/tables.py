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


def fmt_delta(x, digits: int = 4) -> str:
    return "–" if x is None else f"{x:+.{digits}f}"


def label(key: str, a: dict | None = None) -> str:
    """`variant`, or `variant` [group] for a tagged run (train.py --tag)."""
    variant, _, group = key.partition("@")
    return f"`{variant}` [{group}]" if group else f"`{variant}`"


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


def _order(agg: dict) -> list[str]:
    """Main comparison, then the ablations, then tagged groups (by name)."""
    known = [*MAIN, *[v for v in ABLATIONS if v not in MAIN]]
    return [v for v in known if v in agg] + sorted(v for v in agg if v not in known)


def _needle_loss(agg: dict, depths) -> list[str]:
    """Per depth, what the needle is worth: control loss - loss of the value bytes (nats/byte), for the runs that
    have the continuous score."""
    rows = []
    for v in _order(agg):
        for kind in ("single", "multikey"):
            r = agg[v]["retrieval"].get(kind, {})
            if r.get("gain"):
                rows.append([label(v), kind, r["gain"][0]["n"], *[fmt(g, 2) for g in r["gain"]],
                             fmt(r["mean_gain"], 2), fmt(r["mean_loss"], 2)])
    if not rows:
        return []
    return ["", "**What the needle is worth** (teacher-forced loss of the 6 value bytes without the needle line minus "
            "with it, nats/byte, by needle depth: 0 = no retrieval, ln 36 = 3.58 = perfect recall; value loss = the "
            "loss with the needle, chance 3.58)", "",
            *_table(["variant", "probe", "seeds", *[f"{d:g}" for d in depths], "mean gain", "value loss"], rows)]


def _ablations(agg: dict, buckets) -> list[str]:
    """The paper's Table 4: each 1:3 variant against HySparse-1:3 (same seed 0: same data and initial weights; and
    the mean over its seeds)."""
    hs_ = agg.get("hysparse-1:3")
    ref0 = (hs_ or {}).get("val_loss_by_seed", {}).get("0")
    ref_mean = hs_["val_loss"]["mean"] if hs_ and hs_.get("val_loss") else None
    rows = []
    for v in ABLATIONS:
        if v not in agg:
            continue
        a = agg[v]
        own0 = a.get("val_loss_by_seed", {}).get("0")
        gain = a["retrieval"]["single"].get("mean_gain")
        rows.append([f"`{v}`", ABLATION_LABEL[v], len(a["seeds"]), fmt(a["val_loss"], 4),
                     fmt_delta(None if own0 is None or ref0 is None else own0 - ref0),
                     fmt_delta(None if ref_mean is None or a["val_loss"] is None else a["val_loss"]["mean"] - ref_mean),
                     fmt(a["loss_by_bucket"][-1]), fmt(a["retrieval"]["single"]["mean_acc"], 2), fmt(gain, 2),
                     _mib(a["kv_bytes"])])
    if not rows:
        return []
    return ["", "**Ablations at 1:3** (paper Table 4; Δ = val loss minus HySparse-1:3's, at seed 0 (same data and "
            "initial weights) and of the seed means; + is worse; needle gain as above, – where not measured)", "",
            *_table(["variant", "paper row", "seeds", "val loss", "Δ seed 0", "Δ mean", f"loss {buckets[-1]}",
                     "retrieval", "needle gain", "KV MiB"], rows)]


def _retrieval_groups(agg: dict) -> list[str]:
    """Tagged runs (e.g. a retrieval-heavy training mix), apart from the main comparison: another data mix."""
    rows = []
    for v in _order(agg):
        a = agg[v]
        if not a.get("group"):
            continue
        single, mk = a["retrieval"]["single"], a["retrieval"].get("multikey", {})
        exact = single.get("exact") or []
        rows.append([label(v), f"{a.get('needle_rate')} / {a.get('needle_pairs')}", len(a["seeds"]),
                     f"{a['tokens'] / 1e6:.1f}M", fmt(a["val_loss"], 4), fmt(single["mean_acc"], 2),
                     "–" if not exact else f"{sum(e['mean'] for e in exact) / len(exact):.2f}",
                     fmt(single.get("mean_gain"), 2), fmt(mk.get("mean_acc"), 2), fmt(mk.get("mean_gain"), 2)])
    if not rows:
        return []
    return ["", "**Retrieval groups** (tagged runs trained on another needle mix: needle rate = share of sequences "
            "with key-value pairs, pairs = most per sequence; their val loss is on the same held-out text but not "
            "comparable to the main rows, whose mix differs)", "",
            *_table(["run group", "needle rate / pairs", "seeds", "tokens", "val loss", "retrieval", "exact",
                     "needle gain", "multi-key", "multi-key gain"], rows)]


def _locality(sel: dict | None) -> list[str]:
    """dump_selections.py's summary: distinct blocks in the union of a 64-token tile's selections, trained vs random."""
    if not sel:
        return []
    rows = []
    for run, s in sel.items():
        for layer, r in s["layers"].items():
            u, rnd = r["union_blocks_per_tile"], r["random_union_blocks_per_tile"]
            rows.append([f"`{run}`", layer, "–" if u is None else f"{u:.1f}", "–" if rnd is None else f"{rnd:.1f}",
                         "–" if not u or not rnd else f"{u / rnd:.2f}", r["min_possible"],
                         f"{r['share_block0']:.2f}", f"{r['share_own_block']:.2f}"])
    s0 = next(iter(sel.values()))
    return ["", f"**Selection locality** (`dump_selections.py`: distinct key blocks in the union of a "
            f"{s0['tile']}-token query tile's selections, {s0['seqs']} held-out windows of {s0['context']}, tiles "
            f"past top-k {s0['topk']}; random = the same number of blocks per token drawn uniformly among the visible "
            f"ones; floor = blocks per token; block 0 / own = share of selections that are the first / the query's "
            "block)",
            "", *_table(["run", "layer", "union per tile", "random", "trained / random", "floor", "block 0",
                         "own block"], rows)]


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
        for v in _order(agg):
            if kind in agg[v]["retrieval"]:
                r = agg[v]["retrieval"][kind]
                dist = r["distance"]
                rows.append([label(v), *[fmt(x, 2) for x in r["acc"]], fmt(r["mean_acc"], 2)])
        if rows:
            head = [f"{d:g} ({int(x)})" for d, x in zip(depths, dist)]
            lines += ["", f"**{title}** (depth (bytes from needle to value); value-byte accuracy)", ""]
            lines += _table(["variant", *head, "mean"], rows)

    lines += _needle_loss(agg, depths)
    lines += _ablations(agg, buckets)
    lines += _retrieval_groups(agg)

    rows = []
    full_kv = agg.get("full", {}).get("kv_bytes")
    for v in _order(agg):
        a = agg[v]
        ratio = f"{full_kv / a['kv_bytes']:.2f}×" if full_kv and a["kv_bytes"] else "–"
        tok_s = None if a["ms_per_step"] is None else a["tokens"] / a["steps"] / a["ms_per_step"]["mean"] * 1e3
        rows.append([label(v), _mib(a["kv_bytes"]), ratio, fmt(a["ms_per_step"], 1),
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
    lines += _locality(results.get("selections"))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        sys.stdout.write(markdown(json.load(f)))
