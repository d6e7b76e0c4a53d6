"""Export into a folder that cannot be written: refused naming the folder, before the (slow) capture when the
permission is known up front, and with nothing left behind when the write itself fails (docs/errors.md, "Export")."""
import tempfile

import pytest
from exportable import example_ids, sharp_llama

from hysparse_compile.export import program, to_aoti, to_onnx, to_tensorrt

EXPORTERS = {
    "onnx": lambda c, ids, p: to_onnx(c, ids, p),
    "onnx_custom": lambda c, ids, p: to_onnx(c, ids, p, ops="custom"),
    "aoti": lambda c, ids, p: to_aoti(c, ids, p.with_suffix(".pt2")),
    "tensorrt_onnx": lambda c, ids, p: to_tensorrt(c, ids, p, via="onnx"),
}


@pytest.mark.parametrize("fmt", sorted(EXPORTERS))
def test_a_folder_without_write_permission_is_refused_before_the_capture(tmp_path, monkeypatch, fmt):
    import os

    monkeypatch.setattr(os, "access", lambda path, mode: False)
    monkeypatch.setattr(program, "capture", lambda *a, **k: pytest.fail("captured before checking the folder"))
    with pytest.raises(PermissionError, match=f"cannot write into the folder '{tmp_path}'"):
        EXPORTERS[fmt](sharp_llama(), example_ids(1, 20), tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


def test_a_folder_that_refuses_the_write_leaves_nothing_behind(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    with pytest.raises(PermissionError, match=r"cannot write into the folder .*\(PermissionError: Permission denied\)"):
        to_onnx(sharp_llama(), example_ids(1, 20), tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("args, message", [
    (["--batch", "0"], "--batch must be at least 1, got 0"),
    (["--seq-len", "0"], "--seq-len must be at least 1 token, got 0"),
])
def test_cli_export_refuses_an_empty_example(tmp_path, args, message):
    from typer.testing import CliRunner

    from hysparse_compile.cli import app

    result = CliRunner().invoke(app, ["export", *args, str(tmp_path / "m.onnx")])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert not list(tmp_path.iterdir())


def test_the_onnx_translations_include_those_transformers_ships_for_its_moe_op():
    # gpt-oss's experts run transformers::grouped_mm_fallback, which torch.onnx cannot translate on its own
    # (tests/families/test_families.py exports gpt-oss end to end under --full)
    import torch

    pytest.importorskip("onnxscript")
    moe = pytest.importorskip("transformers.integrations.moe")  # registers the op
    from hysparse_compile.export import onnx_standard

    table = onnx_standard.translations()
    assert set(onnx_standard.TRANSLATIONS) <= set(table)
    if hasattr(moe, "_grouped_mm_fallback"):  # the transformers of the dev extra has it
        assert torch.ops.transformers.grouped_mm_fallback.default in table
