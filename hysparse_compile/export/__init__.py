"""Export a compiled HySparse model for deployment: ONNX (standard ops or a `hysparse` custom domain), an
AOTInductor package, TensorRT. Design, formats and what was run where: docs/export.md; ONNX node schemas:
docs/onnx_ops.md.

    >>> from hysparse_compile.export import to_onnx, to_aoti, to_tensorrt
    >>> to_onnx(compiled, ids, "model.onnx")                        # standard ONNX ops; onnxruntime runs it
    >>> to_onnx(compiled, ids, "model-hs.onnx", ops="custom")       # hysparse::FullAttention / SparseAttention nodes
    >>> to_aoti(compiled, ids, "model.pt2")                         # torch._inductor.aoti_load_package("model.pt2")
    >>> to_tensorrt(compiled, ids, "model-trt.onnx", via="onnx")    # ONNX for TensorRT's parser + plugins

Every exporter returns an `ExportResult` (path, files, size, op counts, what was checked) and writes through a
temporary name, so a failed export leaves nothing at `path`.
"""
from .aoti import to_aoti
from .onnx import to_onnx
from .program import ExportResult
from .tensorrt import to_tensorrt

__all__ = ["to_onnx", "to_aoti", "to_tensorrt", "ExportResult"]
