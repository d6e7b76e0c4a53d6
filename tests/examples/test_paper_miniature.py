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
    return {"tmp": tmp, "data": data, "runs": runs, "context": context, "plotted": plotted,
            "results": json.loads((tmp / "results.json").read_text())}


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
