"""Session-scoped export fixtures: each file is exported once (seconds per file on a 2-core CPU) and shared."""
import pytest
from exportable import example_ids, sharp_llama


@pytest.fixture(scope="session")
def standard_file(tmp_path_factory):
    from hysparse_compile.export import to_onnx

    path = tmp_path_factory.mktemp("onnx") / "llama.onnx"
    return to_onnx(sharp_llama(), example_ids(), path, decode=True)  # prefill (+ cache) and decode-step files


@pytest.fixture(scope="session")
def custom_file(tmp_path_factory):
    from hysparse_compile.export import to_onnx

    path = tmp_path_factory.mktemp("onnx") / "llama-custom.onnx"
    return to_onnx(sharp_llama(), example_ids(), path, ops="custom", decode=True)  # prefill (+ cache), decode step
