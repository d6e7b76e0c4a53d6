"""python -m bench.bench_e2e --smoke: every section runs on CPU (tiny model, reference backend, torch.compile backend
"eager") and the JSON holds every row and every ratio with its target."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 300  # about 40 s alone; generous for a loaded 2-core machine


def run_smoke(tmp_path, *args):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               HF_HUB_OFFLINE="1", COLUMNS="200")
    env.pop("OUT", None)
    result = subprocess.run([sys.executable, "-m", "bench.bench_e2e", "--smoke", "--budget-s", "1e9",
                             "--out", str(tmp_path), *args],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    return json.loads((tmp_path / "bench_e2e.json").read_text()), out


def test_best_sections_time_every_variant_and_judge_against_the_fastest_original(tmp_path):
    data, out = run_smoke(tmp_path, "--sections", "best,best_fwdbwd", "--seqlens", "8k,32k", "--calls", "3",
                          "--selections", "tile")
    # the compiled model's sparse layers ran on drawn tile-correlated selections (bench/inject.py), forward and
    # backward: 2 sparse layers x 2 lengths x 2 modes x 3 timed calls, once in `best` and twice (forward and
    # backward) in `best_fwdbwd`, at least 72 (the untimed first calls add more)
    assert data["meta"]["selections"] == "tile" and data["meta"]["injected_calls"] >= 2 * 2 * 2 * 3 * 3
    rows = {(r["section"], r["label"], r["model"], r["mode"]): r for r in data["rows"]}
    variants = {"original": ("eager", "compile[layers]", "compile[causal]"), "compiled": ("eager", "compile")}
    for section in ("best", "best_fwdbwd"):
        for label in ("8k", "32k"):
            for model, modes in variants.items():
                for mode in modes:
                    row = rows[(section, label, model, mode)]
                    assert "error" not in row and row["calls"] == 3, row
                    assert row["ms_min"] <= row["ms"] <= row["ms_max"], row
    for mode in ("compile[layers]", "compile[causal]"):  # the compiled originals compute the eager original
        row = rows[("best", "8k", "original", mode)]
        assert row["logits_rel_vs_eager"] < 1e-5 and row["argmax_agree_vs_eager"] == 1.0, row
    ratios = [r for r in data["ratios"] if r["section"] in ("best", "best_fwdbwd")]
    assert len(ratios) == 2 * 2 * 2
    for r in ratios:
        originals = {m: rows[(r["section"], r["label"], "original", m)]["ms"] for m in variants["original"]}
        assert r["original_best"] == min(originals, key=originals.get)
        compiled_ms = rows[(r["section"], r["label"], "compiled", r["mode"])]["ms"]
        assert abs(r["speedup"] - min(originals.values()) / compiled_ms) < 1e-9
        assert r["met"] == (r["speedup"] >= r["target"])
    assert "compile[causal]" in out  # shown as text, not taken for rich markup


def test_a_4k_row_on_a_selections_npz_with_its_topk(tmp_path):
    """--seqlens 4k --topk N --selections <npz>: the paper miniature's case (its selections.npz holds 4k tokens, top-k
    512); 4k has no target, and the schedule takes the top-k."""
    import numpy as np

    T, nsel = 48, 3  # --smoke: 4k is 48 tokens, block 16
    rng = np.random.default_rng(0)
    sel = np.stack([rng.permutation(max(1, t // 16 + 1))[:1].repeat(nsel) for t in range(T)])  # a visible block
    np.savez(tmp_path / "sel.npz", **{"run/layer0_indices": sel[None].astype(np.int16)})
    data, _ = run_smoke(tmp_path, "--sections", "best", "--seqlens", "4k", "--calls", "1", "--topk", str(16 * nsel),
                        "--selections", str(tmp_path / "sel.npz"))
    assert data["meta"]["schedule"] == "hybrid(4, 3) block 16, topk 48, window 16"
    assert data["meta"]["injected_calls"] >= 2 * 2  # 2 sparse layers x 2 compiled modes, at least
    assert {r["T"] for r in data["rows"]} == {T}
    ratios = [r for r in data["ratios"] if r["section"] == "best"]
    assert len(ratios) == 2 and all("speedup" in r and "target" not in r for r in ratios)


def test_bench_e2e_smoke_writes_every_row_and_ratio(tmp_path):
    data, out = run_smoke(tmp_path, "--sections", "fwd,fwdbwd,stack,compile,compile_fwdbwd", "--profile", "64",
                          "--profile-fwdbwd", "64")
    assert data["meta"]["selections"] == "model" and data["meta"]["injected_calls"] == 0
    rows = {(r["section"], r["label"], r["model"]): r for r in data["rows"] if not r.get("superseded")}
    expected = [("fwd", label) for label in ("8k", "16k", "32k", "128k")]
    expected += [("fwdbwd", "8k"), ("fwdbwd", "32k"), ("stack", "32k")]
    expected += [("compile", label) for label in ("8k", "16k", "32k", "128k")]
    expected += [("compile_fwdbwd", "8k"), ("compile_fwdbwd", "32k")]
    for section, label in expected:
        for model in ("original", "compiled"):
            row = rows.get((section, label, model))
            assert row is not None, (section, label, model)
            assert row.get("ms", 0) > 0 and "error" not in row and "skipped" not in row, row
    assert rows[("compile", "8k", "compiled")]["how"].startswith("torch.compile(")
    assert "HySparse ops called directly" in rows[("stack", "32k", "compiled")]["note"]
    ratios = {(r["section"], r["label"], r["mode"].split("[")[0]): r for r in data["ratios"]}
    assert len(ratios) == len(expected)
    assert all(r["speedup"] > 0 for r in ratios.values())
    targets = {("fwd", "8k"): 1.0, ("fwd", "32k"): 1.15, ("fwd", "128k"): 1.5, ("fwdbwd", "8k"): 1.0,
               ("fwdbwd", "32k"): 1.1}
    for (section, label), target in targets.items():
        assert ratios[(section, label, "eager")]["target"] == target
    assert ratios[("stack", "32k", "eager")]["moonshot"] == 3.0
    for label in ("8k", "32k"):  # the compiled sections are judged against the faster original
        for section, twin in (("compile", "fwd"), ("compile_fwdbwd", "fwdbwd")):
            r = ratios[(section, label, "torch.compile")]
            fastest = min(rows[(section, label, "original")]["ms"], rows[(twin, label, "original")]["ms"])
            assert abs(r["vs_fastest_original"] - fastest / rows[(section, label, "compiled")]["ms"]) < 1e-9
            assert r["met"] == (r["vs_fastest_original"] >= r["target"])
    assert data["meta"]["targets"]["memory"] == 1.05
    assert (tmp_path / "bench_e2e_profile_compiled_64.txt").read_text().strip()
    assert "Backward" in (tmp_path / "bench_e2e_profile_compiled_fwdbwd_64.txt").read_text()
    assert data["meta"]["save_branches"] is False
    assert "speedup = original ms / compiled ms" in out


def test_the_128k_estimate_counts_every_row_and_call_of_the_fair_sections():
    # 32k forwards of 0.3 s each: two single rows need 2 x 8 x 10 x 0.3 = 48 s; the fair forward section's five
    # rows of 7 + 1 calls need (3 + 2) x 8 x 10 x 0.3 = 120 s
    import types

    import torch

    from bench import bench_e2e

    b = types.SimpleNamespace(args=types.SimpleNamespace(budget_s=100.0), elapsed=lambda: 0.0,
                              device=torch.device("cpu"))
    done = {("32k", "original"): 300.0, ("32k", "compiled"): 300.0}
    assert bench_e2e.long_row_blocker(b, done) is None
    why = bench_e2e.long_row_blocker(b, done, {"original": 3 * 8, "compiled": 2 * 8})
    assert why is not None and "~120s needed" in why and "100s left" in why
    assert bench_e2e.long_row_blocker(b, {}, {"original": 24, "compiled": 16}) is None  # no 32k rows: no estimate


def test_full_fwd_names_an_unknown_variant_and_the_valid_ones(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-m", "bench.bench_e2e", "--smoke", "--full-fwd", "fastest"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 2
    assert "--full-fwd 'fastest': choose from ptr_64x64_w4_s3, " in result.stderr and "tma2d_acc" in result.stderr
