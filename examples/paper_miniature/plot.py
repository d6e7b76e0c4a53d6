"""Figures of the miniature from evaluate.py's results.json (matplotlib, Agg: no display needed).

    python examples/paper_miniature/plot.py results.json --out docs/paper_miniature [--selections selections.npz]

Writes loss_curves.png (held-out loss against training tokens, one line per run), loss_by_position.png,
retrieval_by_depth.png (single needle and multi-key), training_free.png (loss and retrieval against top-k) and,
with --selections, selections.png (distinct blocks per 64-token tile against the random case).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

MAIN = ("full", "swa-1:3", "hysparse-1:3", "swa-1:7", "hysparse-1:7")
STYLE = {"full": ("black", "-"), "swa-1:3": ("tab:orange", "-"), "hysparse-1:3": ("tab:blue", "-"),
         "swa-1:7": ("tab:orange", "--"), "hysparse-1:7": ("tab:blue", "--"), "no-swa": ("tab:green", ":"),
         "kv-both": ("tab:red", ":"), "kv-none": ("tab:purple", ":")}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _ordered(agg) -> list[str]:
    """The main comparison first, then the rest by name."""
    return [v for v in (*MAIN, *sorted(set(agg) - set(MAIN))) if v in agg]


def _style(variant, group=None):
    """Color and line style of a variant; `variant@group` (a tagged run group) dash-dotted."""
    name, _, tag = variant.partition("@")
    color, ls = STYLE.get(name, ("gray", "-"))
    return (color, "-.") if tag or group else (color, ls)


def loss_curves(results, out: Path, plt) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, run in sorted(results["runs"].items()):
        color, ls = _style(run["variant"], run.get("group"))
        vc = run["val_curve"]
        tag = f" [{run['group']}]" if run.get("group") else ""
        ax.plot(np.array(vc["tokens"]) / 1e6, vc["val_loss"], color=color, ls=ls, marker=".",
                alpha=1.0 if run["seed"] == 0 else 0.5, label=f"{run['variant']} s{run['seed']}{tag}")
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("held-out loss (nats/byte)")
    ax.set_title("Held-out loss during training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, out / "loss_curves.png", plt)


def loss_by_position(results, out: Path, plt) -> Path:
    agg, buckets = results["variants"], results["settings"]["buckets"]
    names = _ordered(agg)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / max(1, len(names))
    for i, v in enumerate(names):
        means = [b["mean"] for b in agg[v]["loss_by_bucket"]]
        err = [(b["max"] - b["min"]) / 2 for b in agg[v]["loss_by_bucket"]]
        ax.bar(np.arange(len(buckets)) + i * width, means, width, yerr=err, color=_style(v)[0],
               hatch="//" if _style(v)[1] != "-" else None, label=v, alpha=0.85)
    ax.set_xticks(np.arange(len(buckets)) + 0.4 - width / 2, [f"{a}–{b}" for a, b in buckets])
    lo = min(b["mean"] for v in names for b in agg[v]["loss_by_bucket"])
    ax.set_ylim(bottom=lo * 0.95)
    ax.set_xlabel("position in the context (bytes)")
    ax.set_ylabel("held-out loss (nats/byte)")
    ax.set_title("Loss by position")
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, out / "loss_by_position.png", plt)


def retrieval_by_depth(results, out: Path, plt) -> Path:
    """Value-byte accuracy by depth (single needle, multi-key) and, where measured, the needle gain (control loss -
    loss of the value bytes, nats/byte) by depth."""
    agg, depths = results["variants"], results["settings"]["depths"]
    kinds = [k for k in ("single", "multikey") if any(k in a["retrieval"] for a in agg.values())]
    panels = [(k, "acc") for k in kinds] + [(k, "gain") for k in kinds
                                            if any(a["retrieval"].get(k, {}).get("gain") for a in agg.values())]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, (kind, metric) in zip(axes[0], panels):
        for v in _ordered(agg):
            r = agg[v]["retrieval"].get(kind, {})
            if not r.get(metric):
                continue
            color, ls = _style(v)
            mean = [x["mean"] for x in r[metric]]
            ax.plot(depths, mean, color=color, ls=ls, marker="o", label=v.replace("@", " [") + ("]" if "@" in v else ""))
            if r[metric][0]["n"] > 1:
                ax.fill_between(depths, [x["min"] for x in r[metric]], [x["max"] for x in r[metric]], color=color,
                                alpha=0.15)
        title = "single needle" if kind == "single" else "multi-key (2 distractors)"
        if metric == "acc":
            ax.set_ylim(-0.02, 1.02)
            ax.set_ylabel("value-byte accuracy")
        else:
            ax.axhline(0, color="gray", lw=0.8)
            ax.set_ylabel("needle gain (nats/value byte; ln 36 = 3.58 = recall)")
            title += ": loss without - with the needle"
        ax.set_xlabel("needle depth (0 = start of the context)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, out / "retrieval_by_depth.png", plt)


def training_free(results, out: Path, plt) -> Path | None:
    tf = results.get("training_free")
    if not tf:
        return None
    rows = tf["rows"]
    k = [r["topk"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.plot(k, [r["val_loss"] for r in rows], marker="o", label="training-free")
    full = results["variants"].get("full")
    if full:
        a1.axhline(full["val_loss"]["mean"], color="black", ls="--", label="trained full")
    a1.set_xscale("log", base=2)
    a1.set_xlabel("top-k tokens")
    a1.set_ylabel("held-out loss")
    a1.legend()
    for kind, marker in (("single", "o"), ("multikey", "s")):
        if kind in rows[0]["retrieval"]:
            a2.plot(k, [float(np.mean(r["retrieval"][kind]["acc"])) for r in rows], marker=marker, label=kind)
    a2.set_xscale("log", base=2)
    a2.set_ylim(-0.02, 1.02)
    a2.set_xlabel("top-k tokens")
    a2.set_ylabel("retrieval (mean over depths)")
    a2.legend()
    fig.suptitle(f"Training-free: {tf['source_run']} compiled 1:{tf['ratio']}, window {tf['window']}")
    return _save(fig, out / "training_free.png", plt)


def selections(path: Path, out: Path, plt) -> Path:
    data = np.load(path)
    summary = json.loads(str(data["summary_json"]))
    fig, axes = plt.subplots(1, len(summary), figsize=(6 * len(summary), 4), squeeze=False)
    for ax, (run, s) in zip(axes[0], summary.items()):
        for layer in s["layers"]:
            key = layer.replace(" ", "")
            real, rand = data[f"{run}/{key}_union"].mean(0), data[f"{run}/{key}_random_union"].mean(0)
            line, = ax.plot(np.arange(len(real)) * s["tile"], real, label=f"{layer}")
            ax.plot(np.arange(len(rand)) * s["tile"], rand, color=line.get_color(), ls=":", alpha=0.7)
        ax.axhline(s["topk"] // s["block_size"], color="gray", lw=0.8)
        ax.set_xlabel("query tile start (bytes)")
        ax.set_ylabel(f"distinct blocks per {s['tile']}-token tile")
        ax.set_title(f"{run}: solid = trained, dotted = random")
        ax.legend(fontsize=7)
    return _save(fig, out / "selections.png", plt)


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", type=Path)
    ap.add_argument("--out", type=Path, default=Path("docs/paper_miniature"))
    ap.add_argument("--selections", type=Path, help="dump_selections.py output")
    args = ap.parse_args(argv)
    try:
        plt = _plt()
    except ImportError:
        print("plot.py needs matplotlib (pip install matplotlib)", file=sys.stderr)
        return 3
    results = json.loads(args.results.read_text())
    args.out.mkdir(parents=True, exist_ok=True)
    written = [loss_curves(results, args.out, plt), loss_by_position(results, args.out, plt),
               retrieval_by_depth(results, args.out, plt), training_free(results, args.out, plt)]
    if args.selections:
        written.append(selections(args.selections, args.out, plt))
    for p in written:
        if p is not None:
            print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
