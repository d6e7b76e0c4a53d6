"""Merge results files of several GPU calls into one (runs, seed spreads, training-free rows) and write the tables.

    python examples/paper_miniature/merge.py bench/results/h200_2026-11-30_paper_miniature.json out/results.json \
        --out merged.json --markdown merged.md --selections selections.npz

The plan of the miniature does not fit one device call, so it runs in batches (`run_all.sh` with `PLAN=...`), each
writing its own results.json with the same evaluation settings. This joins them: the runs of every file (a run of a
later file replaces one of the same name), the per-variant aggregates recomputed over all of them (mean, min, max over
seeds), the training-free rows of the last file that has some, and, with --selections, the locality summary of
`dump_selections.py` (for the tables); `--doc docs/fidelity.md` puts the tables between its results markers. The
files must agree on the evaluation settings and the data; `--force` merges anyway. Only numpy and the standard
library: it runs anywhere, without torch.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

SAME = ("context", "buckets", "depths", "eval_seqs", "probe_samples", "distractors")


def spread(values: list) -> dict | None:
    """mean, min, max and n of the finite values (the seed spread), or None."""
    vals = [v for v in values if v is not None and np.isfinite(v)]
    if not vals:
        return None
    return {"mean": float(np.mean(vals)), "min": float(np.min(vals)), "max": float(np.max(vals)), "n": len(vals)}


def variant_key(row: dict) -> str:
    """The row's key in results["variants"]: the variant name, or `name@group` for a tagged run (train.py --tag)."""
    return row["variant"] + (f"@{row['group']}" if row.get("group") else "")


def _per_depth(ev: list, kind: str, metric: str) -> list | None:
    lists = [e["retrieval"][kind].get(metric) for e in ev]
    if any(v is None or None in v for v in lists):
        return None
    return [spread(list(v)) for v in zip(*lists)]


def aggregate(runs: dict) -> dict:
    """Per variant (and group): every scalar and per-bucket / per-depth list averaged over seeds, with min and max.
    The continuous retrieval scores (value loss, its control, the gain = control - loss) are aggregated over the runs
    that have them (evaluations before they existed do not)."""
    by_variant: dict[str, list] = {}
    for row in runs.values():
        by_variant.setdefault(variant_key(row), []).append(row)
    out = {}
    for name, rows in by_variant.items():
        ev = [r["eval"] for r in rows]
        agg = {"variant": rows[0]["variant"], "group": rows[0].get("group"),
               "needle_rate": rows[0].get("needle_rate"), "needle_pairs": rows[0].get("needle_pairs"),
               "seeds": sorted(r["seed"] for r in rows), "tokens": rows[0]["tokens"], "steps": rows[0]["steps"],
               "pattern": rows[0]["pattern"], "params": rows[0]["params"], "new_params": rows[0]["new_params"],
               "val_loss": spread([e["val_loss"] for e in ev]),
               "val_loss_by_seed": {str(r["seed"]): r["eval"]["val_loss"] for r in rows},
               "loss_by_bucket": [spread(list(v)) for v in zip(*[e["loss_by_bucket"] for e in ev])],
               "kv_bytes": ev[0]["kv_bytes"], "kv_bytes_runtime": ev[0].get("kv_bytes_runtime"),
               "ms_per_step": spread([r["ms_per_step"] for r in rows]),
               "decode_tok_s": spread([e.get("decode_tok_s") for e in ev]),
               "decode_tok_s_plain": spread([e.get("decode_tok_s_plain") for e in ev]),
               "retrieval": {}}
        for kind in ev[0]["retrieval"]:
            r = {"acc": _per_depth(ev, kind, "acc"), "exact": _per_depth(ev, kind, "exact"),
                 "mean_acc": spread([float(np.mean(e["retrieval"][kind]["acc"])) for e in ev]),
                 "distance": ev[0]["retrieval"][kind]["distance"]}
            scored = [e for e in ev if e["retrieval"][kind].get("loss") and
                      None not in (e["retrieval"][kind].get("control_loss") or [None])]
            if scored:
                gains = [[c - x for x, c in zip(e["retrieval"][kind]["loss"], e["retrieval"][kind]["control_loss"])]
                         for e in scored]
                r["loss"] = _per_depth(scored, kind, "loss")
                r["control_loss"] = _per_depth(scored, kind, "control_loss")
                r["gain"] = [spread(list(v)) for v in zip(*gains)]
                r["mean_loss"] = spread([float(np.mean(e["retrieval"][kind]["loss"])) for e in scored])
                r["mean_gain"] = spread([float(np.mean(g)) for g in gains])
            agg["retrieval"][kind] = r
        out[name] = agg
    return out


def merge(results: list[dict], names: list[str] | None = None, *, force: bool = False) -> dict:
    """One results dict from several (evaluate.py's format); see the module docstring."""
    names = names or [f"results {i}" for i in range(len(results))]
    first = results[0]
    problems = []
    for name, r in zip(names[1:], results[1:]):
        for key in SAME:
            if r["settings"].get(key) != first["settings"].get(key):
                problems.append(f"{name}: settings[{key!r}] = {r['settings'].get(key)} != "
                                f"{first['settings'].get(key)} in {names[0]}")
        for key in ("train", "val"):
            a, b = (first.get("data") or {}).get(key), (r.get("data") or {}).get(key)
            if a and b and a != b:
                problems.append(f"{name}: data[{key!r}] differs from {names[0]} (another corpus)")
    if problems and not force:
        raise ValueError("the results do not compare:\n  " + "\n  ".join(problems))
    runs, sources, replaced = {}, {}, []
    for name, r in zip(names, results):
        for run, row in r["runs"].items():
            if run in runs:
                replaced.append(f"{run} ({sources[run]} -> {name})")
            runs[run] = row
            sources[run] = name
    merged = {"settings": first["settings"], "data": first.get("data"), "runs": runs, "variants": aggregate(runs),
              "sources": {name: sorted(r["runs"]) for name, r in zip(names, results)}, "replaced": replaced,
              "merge_problems": problems}
    for r in results:
        if r.get("training_free"):
            merged["training_free"] = r["training_free"]
        if r.get("selections"):
            merged["selections"] = r["selections"]
    return merged


def selections_summary(path: Path) -> dict:
    """The JSON summary of a dump_selections.py .npz (per run: settings and per-layer locality)."""
    with np.load(path) as data:
        return json.loads(str(data["summary_json"]))


BEGIN, END = "<!-- results:begin (merge.py --doc) -->", "<!-- results:end -->"


def update_doc(doc: Path, tables: str) -> None:
    """Replace the text between the BEGIN and END markers of `doc` (docs/fidelity.md) with `tables`."""
    text = doc.read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{doc} has no {BEGIN} ... {END} markers")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    doc.write_text(f"{head}{BEGIN}\n{tables.rstrip()}\n{END}{tail}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", type=Path, nargs="+", help="results.json files (evaluate.py), oldest first")
    ap.add_argument("--out", type=Path, required=True, help="the merged results.json")
    ap.add_argument("--markdown", type=Path, help="also write the result tables (docs/fidelity.md) as markdown")
    ap.add_argument("--selections", type=Path, help="a dump_selections.py .npz: its locality summary goes in")
    ap.add_argument("--doc", type=Path, help="also put the tables between the results markers of this file "
                    "(docs/fidelity.md)")
    ap.add_argument("--force", action="store_true", help="merge even if the settings or the data differ")
    args = ap.parse_args(argv)
    results = [json.loads(p.read_text()) for p in args.results]
    merged = merge(results, [str(p) for p in args.results], force=args.force)
    if args.selections:
        merged["selections"] = selections_summary(args.selections)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(merged, indent=1) + "\n")
    for line in merged["replaced"]:
        print(f"replaced {line}", file=sys.stderr)
    for line in merged["merge_problems"]:
        print(f"WARNING {line}", file=sys.stderr)
    print(f"wrote {args.out}: {len(merged['runs'])} runs, variants {', '.join(merged['variants'])}", file=sys.stderr)
    if args.markdown or args.doc:
        from tables import markdown

        md = markdown(merged)
        if args.markdown:
            args.markdown.write_text(md)
            print(f"wrote {args.markdown}", file=sys.stderr)
        if args.doc:
            update_doc(args.doc, md)
            print(f"updated the tables in {args.doc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
