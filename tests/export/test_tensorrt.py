"""to_tensorrt up to TensorRT's door: the plugins' torch twins compute the HySparse ops, their shape and dtype
functions agree with the ops' fake implementations, and the ONNX graph TensorRT's parser would read names each
plugin. Building an engine needs TensorRT, which cannot be installed on this project's machines."""
import importlib.util

import onnx
import pytest
import torch
from exportable import example_ids, sharp_llama
from torch._subclasses.fake_tensor import FakeTensorMode

from hysparse_compile import functional as F
from hysparse_compile.export import tensorrt as trt_export
from hysparse_compile.export import to_tensorrt

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None and importlib.util.find_spec("torch_tensorrt")
NO_TENSORRT = ("TensorRT is not installed: it cannot be installed on this project's machines (its wheels download "
               "from a host they cannot reach), so the engine build is not run here")


def test_full_attention_plugin_shapes_match_the_fake_implementation():
    with FakeTensorMode():
        q, k = torch.empty(3, 8, 77, 64), torch.empty(3, 2, 77, 64)
        out, indices, _, _ = torch.ops.hysparse.full_attention(q, k, k, 16, 64, 0.125, False, "auto")
        twin = torch.ops.hysparse.FullAttention(q, k, k, 16, 64, 0.125)
    (out_shape, out_dtype), (idx_shape, idx_dtype) = trt_export.full_attention_shapes(q.shape, k.shape, 16, 64)
    assert (tuple(out.shape), tuple(indices.shape)) == (out_shape, idx_shape) == (tuple(twin[0].shape),
                                                                                 tuple(twin[1].shape))
    assert (out_dtype, idx_dtype) == ("like q", "int32") and indices.dtype == twin[1].dtype == torch.int32


def test_sparse_attention_plugin_shapes_match_the_fake_implementation():
    with FakeTensorMode():
        q, k = torch.empty(2, 4, 50, 32, dtype=torch.float16), torch.empty(2, 2, 50, 32, dtype=torch.float16)
        idx = torch.empty(2, 2, 50, 4, dtype=torch.int32)
        out = torch.ops.hysparse.sparse_attention(q, k, k, k, k, idx, None, None, None, 16, 8, 0.1, False, False,
                                                  "auto")[0]
        ones, sinks = torch.empty(1, 1, 1, 1, dtype=q.dtype), torch.empty(4, dtype=q.dtype)
        twin = torch.ops.hysparse.SparseAttention(q, k, k, k, k, idx, ones, ones, sinks, 16, 8, 0.1, 0, 0, 0, 0)
    ((shape, dtype),) = trt_export.sparse_attention_shapes(q.shape)
    assert tuple(out.shape) == shape == tuple(twin.shape) and out.dtype == twin.dtype == torch.float16


def test_plugin_twins_compute_the_hysparse_ops(gen):
    q, k, v = (torch.randn(2, h, 45, 16, generator=gen) for h in (4, 2, 2))
    gate, sinks = torch.rand(2, 4, 45, 1, generator=gen), torch.randn(4, generator=gen)
    out, indices = F.full_attention(q, k, v, block_size=16, topk=32)
    got = torch.ops.hysparse.FullAttention(q, k, v, 16, 32, 0.25)
    assert torch.equal(got[1], indices) and torch.equal(got[0], out)
    want = F.sparse_attention(q, k, v, k, v, indices, block_size=16, window=8, gate_sparse=gate, sinks=sinks)
    ones = torch.ones(1, 1, 1, 1)
    got = torch.ops.hysparse.SparseAttention(q, k, v, k, v, indices, gate, ones, sinks, 16, 8, 0.25, 0, 1, 0, 1)
    torch.testing.assert_close(got, want)


def test_plugin_onnx_names_each_plugin_for_the_parser(custom_file):
    model = onnx.load(str(custom_file.path))
    trt_export.plugin_onnx(model)
    nodes = [n for n in model.graph.node if n.domain == "hysparse"]
    assert sorted(n.op_type for n in nodes) == ["FullAttention", "SparseAttention"]  # op type = plugin name (prefill)
    for node in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["plugin_namespace"] == b"hysparse" and attrs["plugin_version"] == b"1"
    onnx.checker.check_model(model, full_check=True)


def test_decode_plugin_twins_compute_the_decode_ops_with_the_documented_shapes(gen):
    B, T, S = 2, 37, 40  # a cache longer than the real tokens: entries >= cache_len are ignored
    q, k, v = torch.randn(B, 4, 1, 16, generator=gen), torch.randn(B, 2, S, 16, generator=gen), \
        torch.randn(B, 2, S, 16, generator=gen)
    ring, cache_len = torch.randn(B, 2, 8, 16, generator=gen), torch.tensor([T, 21], dtype=torch.int32)
    out, indices = torch.ops.hysparse.full_attention_decode(q, k, v, cache_len, 16, 32, 0.25, "reference")
    got = torch.ops.hysparse.FullAttentionDecode(q, k, v, cache_len, 16, 32, 0.25)
    assert torch.equal(got[1], indices) and got[1].dtype == torch.int32
    torch.testing.assert_close(got[0], out)
    (out_shape, _), (idx_shape, _) = trt_export.full_attention_shapes(q.shape, k.shape, 16, 32)
    assert (tuple(got[0].shape), tuple(got[1].shape)) == (out_shape, idx_shape) == ((B, 4, 1, 16), (B, 2, 1, 2))
    gate, sinks = torch.rand(B, 4, 1, 1, generator=gen), torch.randn(4, generator=gen)
    want = torch.ops.hysparse.sparse_attention_decode(q, ring, ring, k, v, indices, cache_len, gate, None, sinks,
                                                      16, 8, 0.25, False, "reference")
    ones = torch.ones(1, 1, 1, 1)
    got = torch.ops.hysparse.SparseAttentionDecode(q, ring, ring, k, v, indices, cache_len, gate, ones, sinks, 16, 8,
                                                   0.25, 0, 1, 0, 1)
    torch.testing.assert_close(got, want)
    with FakeTensorMode():
        fake = torch.ops.hysparse.SparseAttentionDecode(*(torch.empty(x.shape, dtype=x.dtype) for x in (
            q, ring, ring, k, v, indices, cache_len, gate, ones, sinks)), 16, 8, 0.25, 0, 1, 0, 1)
    assert (tuple(fake.shape), "like q") == trt_export.sparse_attention_shapes(q.shape)[0]


def test_decode_graphs_for_tensorrt_name_the_decode_plugins_and_get_profiles(tmp_path):
    """The plugin-ready ONNX pair (via='onnx', decode=True) and the Torch-TensorRT capture of the decode step: its
    inputs' optimization profiles make batch and the full layers' cached length dynamic, nothing else."""
    from hysparse_compile.export import onnx_decode

    result = to_tensorrt(sharp_llama(), example_ids(), tmp_path / "m.onnx", via="onnx", decode=True, check=False)
    assert [f.name for f in result.files] == ["m.onnx", "m-decode.onnx"]
    decode = onnx.load(str(result.files[1]))
    nodes = [n for n in decode.graph.node if n.domain == "hysparse"]
    assert sorted({n.op_type for n in nodes}) == ["FullAttentionDecode", "SparseAttentionDecode"]
    assert all({a.name for a in n.attribute} >= {"plugin_namespace", "plugin_version"} for n in nodes)
    _, step = onnx_decode.capture(sharp_llama(), example_ids(2, 40), trt_export.replacements())
    ops = set(trt_export.program.graph_op_counts(step.exported))
    assert {"FullAttentionDecode.default", "SparseAttentionDecode.default"} <= ops
    profiles = dict(zip(step.example, trt_export.input_profiles(step, max_batch=8, max_seq_len=4096)))
    assert profiles["input_ids"] == {"min_shape": (1, 1), "opt_shape": (2, 1), "max_shape": (8, 1)}
    assert profiles["past.lengths"]["max_shape"] == (8,)
    full, ring = profiles["past.0.key"], profiles["past.1.key"]  # layer 0 full (whole context), layer 1 its ring
    assert full["min_shape"] == (1, 2, 1, 16) and full["max_shape"] == (8, 2, 4096, 16)
    assert ring["min_shape"] == (1, 2, ring["opt_shape"][2], 16) and ring["max_shape"][2] == ring["opt_shape"][2]


def test_torch_tensorrt_path_says_exactly_why_it_cannot_run(tmp_path):
    if HAS_TENSORRT:
        pytest.skip("TensorRT is installed here; test_engine_build_matches_pytorch covers this path")
    with pytest.raises(ImportError, match="TensorRT is not installed .* cannot be on the machines"):
        to_tensorrt(sharp_llama(), example_ids(), tmp_path / "m.ep")
    with pytest.raises(ValueError, match="via must be"):
        to_tensorrt(sharp_llama(), example_ids(), tmp_path / "m.ep", via="polygraphy")


@pytest.mark.skipif(not HAS_TENSORRT, reason=NO_TENSORRT)
def test_engine_build_matches_pytorch(tmp_path):  # pragma: no cover - needs TensorRT and a GPU
    compiled = sharp_llama().cuda().half()
    result = to_tensorrt(compiled, example_ids().cuda(), tmp_path / "m.ep")
    assert "TensorRT vs PyTorch" in result.check
