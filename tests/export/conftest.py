"""Session-scoped export fixtures: each file is exported once (seconds per file on a 2-core CPU) and shared. They are
captured from a batch-1 example (one prompt, the most common export call; torch.export specializes sizes 1) and the
tests run them at batches 1 to 3."""
import pytest
from exportable import example_ids, sharp_llama


@pytest.fixture(scope="session")
def standard_file(tmp_path_factory):
    from hysparse_compile.export import to_onnx

    path = tmp_path_factory.mktemp("onnx") / "llama.onnx"
    return to_onnx(sharp_llama(), example_ids(batch=1), path, decode=True)  # prefill (+ cache) and decode-step files


@pytest.fixture(scope="session")
def custom_file(tmp_path_factory):
    from hysparse_compile.export import to_onnx

    path = tmp_path_factory.mktemp("onnx") / "llama-custom.onnx"
    return to_onnx(sharp_llama(), example_ids(batch=1), path, ops="custom", decode=True)  # prefill (+ cache), decode step
