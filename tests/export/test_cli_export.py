"""`hysparse-compile export`: compiles a built-in model, exports it with a progress display and prints a summary
table (file, size, ops, check); bad options exit 2 with a one-line message."""
import pytest
from typer.testing import CliRunner

from hysparse_compile import demo
from hysparse_compile.cli import app

runner = CliRunner()


def _tiny_nanogpt():
    return demo.NanoGPT(hidden=32, layers=2, heads=2, max_pos=128)


def test_export_writes_the_file_and_prints_the_summary(tmp_path, monkeypatch):
    monkeypatch.setitem(demo.MODELS, "nanogpt", _tiny_nanogpt)  # 2 layers: the command, not the model, is tested
    out = tmp_path / "tiny.onnx"
    result = runner.invoke(app, ["export", "--model", "nanogpt", "--pattern", "FS", "--format", "onnx-custom",
                                 "--seq-len", "40", str(out)])
    assert result.exit_code == 0, result.output
    assert out.is_file() and "Traceback" not in result.output
    for words in ("compile (FS)", "capture", "hysparse::FullAttention x1", "hysparse::SparseAttention x1",
                  "checker ok", "KiB", f"wrote {out}"):
        assert words in result.output, words


@pytest.mark.parametrize("args, message", [
    (["--format", "tflite"], "unknown --format 'tflite'; valid formats: onnx, onnx-custom, aoti"),
    (["--model", "bert"], "unknown model 'bert'"),
    (["--pattern", "FSS"], "--pattern has 3 layers but the model has 8"),
    (["--format", "aoti", "--decode"], "must end in .pt2"),
])
def test_bad_options_exit_2_with_a_message(tmp_path, args, message):
    result = runner.invoke(app, ["export", *args, str(tmp_path / "m.onnx")])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "m.onnx").exists()
