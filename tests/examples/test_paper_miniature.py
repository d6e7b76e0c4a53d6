"""The paper miniature (examples/paper_miniature/) end to end at toy size on the CPU: prepare the byte corpus, train
three variants (one HySparse) a few steps, evaluate, dump selections, plot — each script as its own process, as the
GPU run calls them. The pipeline runs once per module; each test checks one thing of what it produced."""
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
HERE = ROOT / "examples" / "paper_miniature"
VARIANTS = ("full", "swa-1:3", "hysparse-1:3")
TIMEOUT_S = 300  # generous for a loaded CI machine; the whole pipeline takes ~45 s on 2 idle cores
sys.path.insert(0, str(HERE))


def _run(script, *args, cwd):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", COLUMNS="160")
    result = subprocess.run([sys.executable, str(HERE / script), *map(str, args)], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=TIMEOUT_S)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{script} {args} exited {result.returncode}:\n{output[-4000:]}"
    return output


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("paper_miniature")
    data, runs = tmp / "data", tmp / "runs"
    _run("prepare_data.py", "--out", data, "--smoke", cwd=tmp)
    train = ("--smoke", "--steps", 4, "--repeat-batch", "--data", data, "--out", runs)
    with ThreadPoolExecutor(len(VARIANTS)) as pool:  # three processes: the compile of one overlaps the others
        list(pool.map(lambda v: _run("train.py", "--variant", v, *train, cwd=tmp), VARIANTS))
    context = json.loads((runs / "full_s0" / "config.json").read_text())["base_model"]["context"]
    with ThreadPoolExecutor(2) as pool:
        evaluated = pool.submit(_run, "evaluate.py", runs, "--data", data, "--out", tmp / "results.json",
                                "--markdown", tmp / "results.md", "--smoke", "--tf-topk", f"32,{context}", cwd=tmp)
        selected = pool.submit(_run, "dump_selections.py", runs / "hysparse-1_3_s0", "--data", data, "--seqs", 2,
                               "--out", tmp / "selections.npz", cwd=tmp)
        evaluated.result(), selected.result()
    plotted = None
    try:
        import matplotlib  # noqa: F401

        plotted = _run("plot.py", tmp / "results.json", "--out", tmp / "plots", "--selections",
                       tmp / "selections.npz", cwd=tmp)
    except ImportError:
        pass
    # a second batch through run_all.sh: a PLAN subset with a tagged run (another needle mix), merged with the first
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               COLUMNS="160", SMOKE="1", STEPS="2", DATA=str(data), RUNS=str(tmp / "runs2"), OUT=str(tmp / "out2"),
               PYTHON=sys.executable, PLAN="hysparse-1:3 1 - --tag needle --needle-rate 1.0 --needle-pairs 3;",
               MERGE=str(tmp / "results.json"))
    batch = subprocess.run(["bash", str(HERE / "run_all.sh")], cwd=tmp, env=env, capture_output=True, text=True,
                           timeout=TIMEOUT_S)
    assert batch.returncode == 0, f"run_all.sh PLAN=... MERGE=... exited {batch.returncode}:\n" \
                                  f"{(batch.stdout + batch.stderr)[-4000:]}"
    return {"tmp": tmp, "data": data, "runs": runs, "context": context, "plotted": plotted,
            "results": json.loads((tmp / "results.json").read_text()), "batch_log": batch.stdout,
            "merged": json.loads((tmp / "out2" / "merged.json").read_text())}


def test_prepare_writes_byte_splits_and_a_manifest(pipeline):
    data = pipeline["data"]
    manifest = json.loads((data / "manifest.json").read_text())
    for split in ("train", "val"):
        raw = (data / f"{split}.bin").read_bytes()
        assert len(raw) == manifest[split]["bytes"] > 0
        assert raw.endswith(b"\0") and b"def " in raw  # Python files joined by NUL
    assert manifest["val_packages"] and manifest["train"]["packages"] > 0


def test_prepare_from_the_file_list_rebuilds_the_same_bytes(pipeline, tmp_path):
    _run("prepare_data.py", "--out", tmp_path / "again", "--smoke", "--file-list", pipeline["data"] / "files.tsv",
         cwd=tmp_path)
    for split in ("train", "val"):
        assert (tmp_path / "again" / f"{split}.bin").read_bytes() == (pipeline["data"] / f"{split}.bin").read_bytes()


def test_every_run_saves_its_model_config_and_metrics(pipeline):
    for variant in VARIANTS:
        run = pipeline["runs"] / f"{variant.replace(':', '_')}_s0"
        for name in ("model.pt", "config.json", "metrics.json"):
            assert (run / name).is_file(), f"{run / name} is missing"
        config = json.loads((run / "config.json").read_text())
        assert config["variant"] == variant and (config["schedule"] is not None) == variant.startswith("hysparse")


def test_training_loss_is_finite_and_falls_on_a_repeated_batch(pipeline):
    for variant in VARIANTS:
        m = json.loads((pipeline["runs"] / f"{variant.replace(':', '_')}_s0" / "metrics.json").read_text())
        losses = m["curve"]["train_loss"]
        assert len(losses) == 4 and all(np.isfinite(losses)), (variant, losses)
        assert losses[-1] < losses[0] - 0.05, (variant, losses)
        assert m["ms_per_step"] > 0 and m["tokens"] == 4 * m["tokens_per_step"]


def test_the_hysparse_run_trains_new_gate_and_sink_weights(pipeline):
    m = json.loads((pipeline["runs"] / "hysparse-1_3_s0" / "metrics.json").read_text())
    assert m["new_params"] > 0
    import torch

    state = torch.load(pipeline["runs"] / "hysparse-1_3_s0" / "model.pt")
    assert any("hysparse" in k for k in state)


def test_losses_and_retrieval_are_in_range(pipeline):
    res = pipeline["results"]
    assert set(VARIANTS) <= set(res["variants"])
    for name, run in res["runs"].items():
        ev = run["eval"]
        assert len(ev["loss_by_bucket"]) == len(res["settings"]["buckets"]) == 4
        assert all(0 < v < 10 for v in ev["loss_by_bucket"]), name
        for kind in ("single", "multikey"):
            r = ev["retrieval"][kind]
            assert len(r["acc"]) == len(res["settings"]["depths"])
            assert all(0.0 <= a <= 1.0 for a in r["acc"] + r["exact"]), (name, kind, r)


def test_hysparse_keeps_less_kv_cache_than_full(pipeline):
    agg = pipeline["results"]["variants"]
    assert 0 < agg["hysparse-1:3"]["kv_bytes"] < agg["full"]["kv_bytes"]
    assert agg["swa-1:3"]["kv_bytes"] == agg["hysparse-1:3"]["kv_bytes"]  # the paper: HySparse's KV = Hybrid SWA's
    ev = pipeline["results"]["runs"]["hysparse-1_3_s0"]["eval"]
    assert ev["decode_tok_s"] > 0


def test_training_free_with_every_block_selected_reproduces_the_trained_full_model(pipeline):
    res = pipeline["results"]
    rows = {r["topk"]: r for r in res["training_free"]["rows"]}
    assert set(rows) == {32, pipeline["context"]}
    full = res["runs"]["full_s0"]["eval"]
    assert rows[pipeline["context"]]["val_loss"] == pytest.approx(full["val_loss"], rel=1e-5)
    assert rows[pipeline["context"]]["kv_bytes"] == full["kv_bytes"]  # training-free keeps every layer's K/V


def test_selections_are_dumped_with_locality_stats(pipeline):
    sel = np.load(pipeline["tmp"] / "selections.npz")
    summary = json.loads(str(sel["summary_json"]))["hysparse-1_3_s0"]
    assert list(summary["layers"]) == ["layer 0", "layer 3"]  # the full layers of FSSF
    idx = sel["hysparse-1_3_s0/layer0_indices"]  # [Hkv, T, nsel]
    assert idx.shape == (1, pipeline["context"], summary["topk"] // summary["block_size"])
    t = np.arange(idx.shape[1])[:, None]
    assert ((idx[0] == -1) | ((idx[0] >= 0) & (idx[0] <= t // summary["block_size"]))).all()  # causal blocks


def test_results_markdown_and_plots_are_written(pipeline):
    md = (pipeline["tmp"] / "results.md").read_text()
    assert "**Main comparison**" in md and "`hysparse-1:3`" in md and "**Training-free**" in md
    if pipeline["plotted"] is None:
        pytest.skip("matplotlib is not installed")
    for name in ("loss_curves", "loss_by_position", "retrieval_by_depth", "training_free", "selections"):
        assert (pipeline["tmp"] / "plots" / f"{name}.png").stat().st_size > 1000


def test_the_needle_probe_puts_the_value_after_the_query_and_in_the_needle():
    from corpus import LINE_LEN, QUERY_LEN, VALUE_LEN, needle_probe

    filler = np.frombuffer(b"x = 1\n" * 200, dtype=np.uint8)
    for depth in (0.0, 0.5, 1.0):
        p = needle_probe(filler, np.random.default_rng(0), context=512, depth=depth, distractors=2)
        text = bytes(p.tokens)
        value = text[-VALUE_LEN:]
        query = text[-VALUE_LEN - QUERY_LEN:-VALUE_LEN]
        needle = text[p.needle_start:p.needle_start + LINE_LEN]
        assert query.startswith(b"\nKEY_") and needle == query + value + b'"\n'
        assert text.count(b"KEY_") == 4  # needle, two distractors, query
        assert p.distance == p.value_start - p.needle_start > 0


def test_a_plan_subset_runs_only_its_runs_and_merges_with_the_first_batch(pipeline):
    tmp = pipeline["tmp"]
    assert "plan: 1 runs" in pipeline["batch_log"]
    trained = sorted(p.name for p in (tmp / "runs2").iterdir() if (p / "config.json").exists())
    assert trained == ["hysparse-1_3_s1_needle"]
    second = json.loads((tmp / "out2" / "results.json").read_text())
    run = second["runs"]["hysparse-1_3_s1_needle"]
    assert run["group"] == "needle" and run["needle_rate"] == 1.0 and run["needle_pairs"] == 3
    assert "training_free" not in second  # the batch has no untagged `full` run
    merged = pipeline["merged"]
    assert set(merged["runs"]) == set(pipeline["results"]["runs"]) | {"hysparse-1_3_s1_needle"}
    assert merged["training_free"] == pipeline["results"]["training_free"]  # kept from the first batch
    # the tagged run is a group of its own: the main variants keep their seeds and numbers
    assert merged["variants"]["hysparse-1:3"]["seeds"] == [0]
    assert merged["variants"]["hysparse-1:3"]["val_loss"] == \
        pipeline["results"]["variants"]["hysparse-1:3"]["val_loss"]
    assert merged["variants"]["hysparse-1:3@needle"]["group"] == "needle"
    md = (tmp / "out2" / "merged.md").read_text()
    assert "**Retrieval groups**" in md and "`hysparse-1:3` [needle]" in md and "**What the needle is worth**" in md
    assert "Δ seed 0" in md and "**Training-free**" in md


def test_merge_recomputes_seed_spreads_and_refuses_other_settings(pipeline, tmp_path):
    import merge

    first = pipeline["results"]
    second = json.loads(json.dumps(first))  # the same runs as seed 1 of every variant
    second["runs"] = {name.replace("_s0", "_s1"): dict(run, seed=1, eval=dict(run["eval"],
                                                                              val_loss=run["eval"]["val_loss"] + 0.2))
                      for name, run in first["runs"].items()}
    second.pop("training_free")
    m = merge.merge([first, second])
    a = m["variants"]["full"]
    assert a["seeds"] == [0, 1] and a["val_loss"]["n"] == 2
    assert a["val_loss"]["max"] - a["val_loss"]["min"] == pytest.approx(0.2)
    assert set(a["val_loss_by_seed"]) == {"0", "1"}
    assert "training_free" in m
    other = json.loads(json.dumps(second))
    other["settings"]["context"] *= 2
    with pytest.raises(ValueError, match="context"):
        merge.merge([first, other])
    assert merge.merge([first, other], force=True)["merge_problems"]


def test_the_retrieval_score_is_perfect_for_a_copying_model_and_chance_without_the_needle():
    """The probe's scoring against a trivially solvable case: a model that copies what followed the last earlier
    occurrence of the preceding 13 bytes (`\\nKEY_xxxxx = "` and the value so far) gets every value byte, and on the
    control copy (needle removed) it has nothing to copy."""
    import math

    import torch

    from corpus import QUERY_LEN, probe_set
    from evaluation import retrieval

    class Copier(torch.nn.Module):
        def forward(self, x):
            B, T = x.shape
            logits = torch.zeros(B, T, 256)
            for b in range(B):
                row = bytes(x[b].tolist())
                for t in range(QUERY_LEN, T):
                    j = row.rfind(row[t - QUERY_LEN + 1:t + 1], 0, t)
                    if j >= 0:
                        logits[b, t, row[j + QUERY_LEN]] = 30.0
            return logits

    filler = np.frombuffer(b"def f(x):\n    return x + 1\n" * 40, dtype=np.uint8)
    for kind, distractors in (("single", 0), ("multikey", 2)):
        probes = probe_set(filler, context=256, depths=(0.0, 0.5, 0.9), samples=3, distractors=distractors)
        r = retrieval(Copier(), probes, device=torch.device("cpu"), batch=2)
        assert r["acc"] == r["exact"] == [1.0, 1.0, 1.0], kind
        assert max(r["loss"]) < 1e-6
        assert min(r["control_loss"]) == pytest.approx(math.log(256), rel=1e-3)  # no needle: uniform over bytes
