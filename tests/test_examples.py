"""Every example and the demo run as-is on CPU (each as its own process, as a user would run it)."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240  # generous for a loaded 2-core CI machine; each one takes well under a minute alone


def _run(args, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               HF_HUB_OFFLINE="1", COLUMNS="160")
    result = subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=TIMEOUT_S)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{args} exited {result.returncode}:\n{output[-4000:]}"
    return output


def test_plan_paper_presets_prints_both_presets_at_32k_and_128k(tmp_path):
    out = _run([ROOT / "examples" / "plan_paper_presets.py"], tmp_path)
    assert out.count("hysparse-7b") == 2 and out.count("hysparse-80b-a3b") == 2
    assert "9.47x" in out and "(347078656 B)" in out


def test_compile_hf_llama_and_train_reduces_the_loss(tmp_path):
    out = _run([ROOT / "examples" / "compile_hf_llama_and_train.py"], tmp_path)
    assert "step  9" in out and "new parameters" in out


def test_compile_nanogpt_runs_forward_and_backward(tmp_path):
    out = _run([ROOT / "examples" / "compile_nanogpt.py"], tmp_path)
    assert "logits (2, 128, 256)" in out and "finite gradients" in out


def test_inspect_and_render_writes_dot_and_html(tmp_path):
    out = _run([ROOT / "examples" / "inspect_and_render.py", tmp_path / "render"], tmp_path)
    assert (tmp_path / "render" / "hysparse.dot").read_text().strip().endswith("}")
    assert "<html" in (tmp_path / "render" / "hysparse.html").read_text().lower()
    assert "wrote" in out


def test_convert_hybrid_swa_reproduces_then_converts_and_fine_tunes(tmp_path):
    out = _run([ROOT / "examples" / "convert_hybrid_swa.py"], tmp_path)
    assert "KV plan before (the original, pattern WWFWWF)" in out and "KV plan after (WWFSSF)" in out
    assert "training_free, topk=0 (WWFSSF): max |compiled - original|" in out
    assert "gates 4)" in out and "28 of 28 trainable tensors moved" in out and "gradient checkpointing: True" in out
    assert "SWA ring buffer of 16 tokens (sparse branch reads layer 2)" in out


def test_demo_trains_and_passes_the_exactness_check(tmp_path):
    out = _run(["-m", "hysparse_compile.cli", "demo"], tmp_path)
    assert "PASS" in out and "FAIL" not in out
    assert "loss" in out and "NOT down" not in out
