"""The hysparse-compile command line: schedule show/validate/presets, plan, and user errors (exit 2, no traceback)."""
import pytest
from typer.testing import CliRunner

from hysparse_compile.cli import app
from hysparse_compile.kv_plan import plan_kv
from hysparse_compile.schedule import Schedule

runner = CliRunner()


def _run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


def test_presets_lists_both_paper_presets():
    result = _run("schedule", "presets")
    assert result.exit_code == 0
    assert "hysparse-7b" in result.output and "hysparse-80b-a3b" in result.output


def test_show_preset_prints_every_layer_and_a_summary():
    result = _run("schedule", "show", "hysparse-80b-a3b")
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if line.startswith("│")]
    assert len(rows) == 49
    assert sum(" full " in r for r in rows) == 5
    assert "layer 36 (sparse branch)" in result.output
    assert "49 layers (5 full, 44 sparse)" in result.output


def test_show_reads_a_schedule_file(tmp_path):
    path = Schedule.from_pattern("FSSF S", window=96, kv_sharing="both").dump(tmp_path / "s.json")
    result = _run("schedule", "show", path)
    assert result.exit_code == 0, result.output
    assert "layer 3 (both branches)" in result.output and "96" in result.output
    assert "5 layers (2 full, 3 sparse)" in result.output


def test_validate_accepts_a_good_file(tmp_path):
    path = Schedule.hybrid(12, 3, topk=256).dump(tmp_path / "good.yaml")
    result = _run("schedule", "validate", path)
    assert result.exit_code == 0
    assert result.output.strip() == "ok: 12 layers (4 full, 8 sparse)"


@pytest.mark.parametrize("text, message", [
    ("pattern: SFFS\n", "starts with a sparse layer"),
    ("pattern: FSSS\ntopk: 100\n", "topk must be a positive multiple of block_size=64"),
    ("pattern: FSXS\n", "unknown letter"),
    ("pattern: FSSS\nwindw: 64\n", "unknown key 'windw'"),
    ("pattern: [FSSS\n", "not valid YAML"),
])
def test_validate_rejects_a_bad_file_with_exit_2(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    result = _run("schedule", "validate", path)
    assert result.exit_code == 2
    assert message in result.output


def test_validate_missing_file_exits_2(tmp_path):
    result = _run("schedule", "validate", tmp_path / "missing.toml")
    assert result.exit_code == 2
    assert "no such schedule file" in result.output


def test_unknown_preset_lists_valid_ones():
    result = _run("schedule", "show", "hysparse-8b")
    assert result.exit_code == 2
    assert "unknown preset 'hysparse-8b'" in result.output
    assert "hysparse-7b, hysparse-80b-a3b" in result.output


def test_plan_prints_total_against_full_attention():
    result = _run("plan", "hysparse-80b-a3b", "--kv-heads", 4, "--head-dim", 128, "--seq-len", "32k")
    assert result.exit_code == 0, result.output
    total, baseline = 5 * 2048 * 32768 + 44 * 2048 * 128, 49 * 2048 * 32768
    assert f"({total} B)" in result.output and f"({baseline} B)" in result.output


def test_plan_with_budget_prints_max_batch_and_context_for_both():
    result = _run("plan", "hysparse-7b", "--seq-len", "131072", "--batch", 2, "--budget", "80GiB")
    assert result.exit_code == 0, result.output
    plan = plan_kv(Schedule.preset("hysparse-7b"), num_kv_heads=8, head_dim=128, batch=2, seq_len=131072,
                   dtype="bfloat16")
    budget = 80 * 2**30
    batch_row = next(line for line in result.output.splitlines() if "max batch at context 131072" in line)
    context_row = next(line for line in result.output.splitlines() if "max context at batch 2" in line)
    assert batch_row.split()[-4:-1:2] == [str(plan.max_batch(budget, 131072)),
                                          str(plan.max_batch(budget, 131072, baseline=True))]
    assert context_row.split()[-4:-1:2] == [str(plan.max_seq_len(budget, 2)),
                                            str(plan.max_seq_len(budget, 2, baseline=True))]


@pytest.mark.parametrize("args, message", [
    (["--dtype", "fp13"], "unknown KV cache dtype 'fp13'"),
    (["--kv-heads", "0"], "num_kv_heads must be a positive int"),
    (["--seq-len", "lots"], "--seq-len must be a positive token count"),
    (["--budget", "80 parsecs"], "budget must be a byte count"),
])
def test_plan_rejects_bad_options_with_exit_2(args, message):
    result = _run("plan", "hysparse-7b", *args)
    assert result.exit_code == 2
    assert message in result.output


def test_inspect_unknown_model_lists_valid_ones():
    result = _run("inspect", "--model", "bert-tiny")
    assert result.exit_code == 2
    assert "unknown model 'bert-tiny'; valid models: llama-tiny, gpt2-tiny, nanogpt" in result.output


def test_inspect_pattern_of_wrong_length_exits_2():
    result = _run("inspect", "--model", "nanogpt", "--pattern", "FSS")
    assert result.exit_code == 2
    assert "--pattern has 3 layers but the model has 8 attention layers" in result.output


def test_generate_prints_tokens_per_second_and_cache_bytes_against_the_original():
    result = _run("generate", "--model", "nanogpt", "--pattern", "FSSS", "--prompt-len", "40", "--new", "6")
    assert result.exit_code == 0, result.output
    assert "FSSSFSSS" in result.output and "tokens/s" in result.output and "KV cache" in result.output
    assert "none (recomputes)" in result.output and "PASS" in result.output


def test_generate_refuses_more_tokens_than_positions():
    result = _run("generate", "--model", "gpt2-tiny", "--prompt-len", "500", "--new", "50")
    assert result.exit_code == 2 and "positions" in result.output


def test_inspect_prints_roles_and_writes_dot_and_html(tmp_path):
    dot, html = tmp_path / "g.dot", tmp_path / "g.html"
    result = _run("inspect", "--model", "llama-tiny", "--pattern", "FSSS FSSF", "--dot", dot, "--html", html)
    assert result.exit_code == 0, result.output
    assert "sparse" in result.output and "full" in result.output
    assert dot.read_text().strip().endswith("}") and "<html" in html.read_text().lower()


def test_show_training_free_schedule_marks_the_merged_window(tmp_path):
    path = Schedule.hybrid(8, 3, mode="training_free", block_size=16, topk=128, window=32).dump(tmp_path / "tf.toml")
    result = _run("schedule", "show", path)
    assert result.exit_code == 0, result.output
    assert result.output.count("merged 32") == 5 and "own (indices from 4)" in result.output
    assert "mode training_free" in result.output


def test_plan_reads_a_schedule_file(tmp_path):
    path = Schedule.from_pattern("FSSS", window=64).dump(tmp_path / "s.yaml")
    result = _run("plan", path, "--kv-heads", 2, "--head-dim", 64, "--seq-len", 1000, "--dtype", "float32")
    token = 2 * 2 * 64 * 4
    assert result.exit_code == 0, result.output
    assert f"({token * (1000 + 3 * 64)} B)" in result.output and f"({token * 4 * 1000} B)" in result.output


def test_demo_exactness_check_reports_fail_when_logits_differ(monkeypatch):
    import io

    from rich.console import Console

    import hysparse_compile
    from hysparse_compile import demo

    model = demo.build_model("nanogpt")
    monkeypatch.setattr(hysparse_compile, "compile", lambda m, s, **kw: (lambda ids: m(ids) * 1.01), raising=False)
    out = io.StringIO()
    assert demo.exactness_check(model, Console(file=out, width=200)) is False
    assert "FAIL" in out.getvalue()
