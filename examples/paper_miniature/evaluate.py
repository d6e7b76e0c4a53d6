"""Collect every run of the miniature into one results file, with the training-free rows and seed spreads.

    python examples/paper_miniature/evaluate.py runs/ --out results.json --markdown results.md
    python examples/paper_miniature/evaluate.py /tmp/pm_runs --data /tmp/pm_data --out /tmp/pm_results.json --smoke

For each run folder (config.json, model.pt, metrics.json) the final evaluation `train.py` stored is reused when it
was made with the same settings (`--recompute` redoes it from model.pt). Then the trained `full` model (seed 0, or
the lowest seed) is compiled with `mode="training_free"` at each `--tf-topk` and evaluated without training: held-out
loss by position and retrieval (no decode timing; its sparse layers keep a whole cache each, as `full` does).
`--markdown` writes the tables of docs/fidelity.md filled in.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import common
import variants
from common import console
from corpus import Corpus, probe_set
from evaluation import EvalSettings, evaluate_model
from merge import aggregate
from tables import markdown


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", type=Path, help="folder of run folders (train.py --out)")
    ap.add_argument("--out", type=Path, default=Path("results.json"))
    ap.add_argument("--markdown", type=Path, help="also write the result tables as markdown")
    ap.add_argument("--data", type=Path, default=common.HERE / "data")
    ap.add_argument("--tf-topk", default="auto", help="comma list of top-k tokens for the training-free rows; auto: "
                    "context/16, /8, /4 and the whole context (the exactness check; --smoke: context/4); '' to skip")
    ap.add_argument("--tf-ratio", type=int, default=3, help="full:sparse ratio of the training-free schedule")
    ap.add_argument("--recompute", action="store_true", help="evaluate every run again from model.pt")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--backend", default="auto", choices=("auto", "reference", "flex", "triton"))
    ap.add_argument("--smoke", action="store_true", help="one training-free top-k, no hs.generate twin of `full`")
    return ap.parse_args(argv)


def settings_of(metrics: dict, context: int) -> EvalSettings:
    s = metrics.get("eval_settings")
    return EvalSettings(**s) if s else EvalSettings.for_context(context)


def training_free_rows(run: Path, topks: list[int], ratio: int, corpus: Corpus, settings: EvalSettings, *,
                       device, backend) -> dict:
    """The trained full model compiled with mode="training_free" at each top-k, evaluated as it is."""
    config = common.read_json(run / "config.json")
    state = torch.load(run / "model.pt", map_location=device)
    built = variants.load_run(config, state, device=device, backend=backend)
    sparse = variants.SparseSettings(**config["sparse"])
    T = settings.context
    windows = corpus.fixed_windows("val", count=settings.eval_seqs, length=T + 1)
    probes = {kind: probe_set(corpus.val, context=T, depths=settings.depths, samples=settings.probe_samples,
                              distractors=n) for kind, n in settings.distractors.items()}
    rows = []
    with common.progress("training-free") as bar:
        task = bar.add_task("training-free", total=len(topks), info="")
        for k in topks:
            compiled = variants.training_free(built.plain, ratio, sparse, k, device=device, backend=backend)
            tf = variants.Built(compiled, built.plain, compiled.schedule, built.cfg)
            row = evaluate_model(tf, corpus, settings, device=device, decode=False, windows=windows, probes=probes)
            rows.append({"topk": k, "pattern": compiled.schedule.pattern, **row})
            bar.update(task, advance=1, info=f"topk {k}: val {row['val_loss']:.4f}")
    return {"source_run": run.name, "ratio": ratio, "window": sparse.window, "block_size": sparse.block_size,
            "rows": rows}


def main(argv=None) -> int:
    args = parse(argv)
    device = common.pick_device(args.device)
    t0 = time.perf_counter()
    corpus = Corpus(args.data)
    run_dirs = sorted(p for p in args.runs.iterdir() if (p / "config.json").exists() and (p / "model.pt").exists())
    if not run_dirs:
        console.print(f"[red]no runs under {args.runs} (folders with config.json and model.pt)")
        return 1
    runs = {}
    with common.progress("runs") as bar:
        task = bar.add_task("runs", total=len(run_dirs), info="")
        for run in run_dirs:
            config, metrics = common.read_json(run / "config.json"), common.read_json(run / "metrics.json")
            context = config["base_model"]["context"]
            settings = settings_of(metrics, context)
            if args.recompute or "eval" not in metrics:
                state = torch.load(run / "model.pt", map_location=device)
                built = variants.load_run(config, state, device=device, backend=args.backend)
                twin = variants.all_full(built.plain, variants.SparseSettings(**config["sparse"]), device=device,
                                         backend=args.backend) if not args.smoke and \
                    variants.VARIANTS[config["variant"]].kind == "full" else None
                metrics["eval"] = evaluate_model(built, corpus, settings, device=device, runtime_twin=twin)
                metrics["eval_settings"] = settings.to_dict()
            metrics.pop("ms_per_step_all", None)
            runs[run.name] = metrics
            bar.update(task, advance=1, info=f"{run.name}: val {metrics['eval']['val_loss']:.4f}")

    first = next(iter(runs.values()))
    settings = EvalSettings(**first["eval_settings"])
    results = {"settings": settings.to_dict(), "data": {k: corpus.manifest.get(k) for k in ("sources", "train", "val")},
               "runs": runs, "variants": aggregate(runs)}
    full_runs = sorted((r["seed"], name) for name, r in runs.items() if r["variant"] == "full" and not r.get("group"))
    if full_runs and args.tf_topk:
        T = settings.context
        block = common.read_json(args.runs / full_runs[0][1] / "config.json")["sparse"]["block_size"]
        if args.tf_topk == "auto":
            topks = [T // 4] if args.smoke else [T // 16, T // 8, T // 4, T]
        else:
            topks = [int(k) for k in args.tf_topk.split(",")]
        topks = sorted({max(block, k // block * block) for k in topks})
        results["training_free"] = training_free_rows(args.runs / full_runs[0][1], topks, args.tf_ratio, corpus,
                                                      settings, device=device, backend=args.backend)
    results["eval_s"] = time.perf_counter() - t0
    common.write_json(args.out, results)
    console.print(f"wrote {args.out} ({len(runs)} runs, {results['eval_s']:.1f} s)")
    if args.markdown:
        args.markdown.write_text(markdown(results))
        console.print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
