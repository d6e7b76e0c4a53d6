"""to_tensorrt up to TensorRT's door: the plugins' torch twins compute the HySparse ops, their shape and dtype
functions agree with the ops' fake implementations, and the ONNX graph TensorRT's parser would read names each
plugin. Building an engine needs TensorRT, which cannot be installed on this project's machines."""
import importlib.util

import onnx
import pytest
import torch
from exportable import example_ids, sharp_llama
from oracle import oracle_full, oracle_sparse, random_indices, rel_err
from oracle_model import full_decode, ring_of, sparse_decode
from torch._subclasses.fake_tensor import FakeTensorMode

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


@pytest.mark.parametrize("Hq, Hkv", [(4, 2), (4, 4)])
def test_full_attention_twin_computes_the_oracle(gen, Hq, Hkv):
    """The FullAttention plugin's computation against the float64 oracle (tests/oracle.py), not against the op it
    calls: T = 45 (not a multiple of the block), 2 of up to 3 blocks selected."""
    q, k, v = (torch.randn(2, h, 45, 16, generator=gen) for h in (Hq, Hkv, Hkv))
    out, indices = torch.ops.hysparse.FullAttention(q, k, v, 16, 32, 0.25)
    want_out, _, want_indices = oracle_full(q, k, v, 16, 32, 0.25)
    assert indices.dtype == torch.int32 and torch.equal(indices.long(), want_indices)
    assert rel_err(out, want_out) <= 1e-5


@pytest.mark.parametrize("merge, flags", [(0, (1, 1, 1)), (0, (1, 0, 1)), (0, (0, 1, 0)), (1, (0, 0, 1))],
                         ids=["gates-sinks", "no-swa-gate", "no-sparse-gate-no-sinks", "merge"])
def test_sparse_attention_twin_computes_the_oracle(gen, merge, flags):
    """The SparseAttention plugin's computation, fillers where a `has_*` flag is 0 (ones, -inf), against the oracle
    with those inputs absent: random per-channel / per-head gates and sinks, a real selection."""
    B, Hq, T = 2, 4, 45
    q, k_own, v_own, k_sh, v_sh = (torch.randn(B, h, T, 16, generator=gen) for h in (Hq, 2, 2, 2, 2))
    if merge:
        k_own, v_own = k_sh, v_sh
    indices = random_indices(B, 2, T, 16, 2, generator=gen)
    gate_sparse, gate_swa = torch.rand(B, Hq, T, 16, generator=gen), torch.rand(B, Hq, T, 1, generator=gen)
    sinks = torch.randn(Hq, generator=gen)
    has_gs, has_gw, has_sinks = flags
    fill = (gate_sparse if has_gs else torch.ones(1, 1, 1, 1), gate_swa if has_gw else torch.ones(1, 1, 1, 1),
            sinks if has_sinks else torch.full((Hq,), float("-inf")))
    got = torch.ops.hysparse.SparseAttention(q, k_own, v_own, k_sh, v_sh, indices, *fill, 16, 8, 0.25, merge, *flags)
    want = oracle_sparse(q, k_own, v_own, k_sh, v_sh, indices, 16, 8, gate_sparse if has_gs and not merge else None,
                         gate_swa if has_gw and not merge else None, sinks if has_sinks else None, 0.25, bool(merge))
    assert rel_err(got, want) <= 1e-5


def test_plugin_onnx_names_each_plugin_for_the_parser(custom_file):
    model = onnx.load(str(custom_file.path))
    trt_export.plugin_onnx(model)
    nodes = [n for n in model.graph.node if n.domain == "hysparse"]
    assert sorted(n.op_type for n in nodes) == ["FullAttention", "SparseAttention"]  # op type = plugin name (prefill)
    for node in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["plugin_namespace"] == b"hysparse" and attrs["plugin_version"] == b"1"
    onnx.checker.check_model(model, full_check=True)


def test_decode_plugin_twins_compute_the_oracle_with_the_documented_shapes(gen):
    """The decode plugins against the float64 oracle (tests/oracle_model.py): rows at different positions in a cache
    longer than them (entries >= cache_len ignored), the SWA window read from a ring (position p in slot p % W; slots
    holding no position are filled with 1e3), random gates and sinks."""
    B, S, W = 2, 40, 8
    cache_len = torch.tensor([37, 5], dtype=torch.int32)  # row 1: fewer tokens than top-k, a ring not yet full
    q, k, v = torch.randn(B, 4, 1, 16, generator=gen), torch.randn(B, 2, S, 16, generator=gen), \
        torch.randn(B, 2, S, 16, generator=gen)
    k_own, v_own = torch.randn(B, 2, S, 16, generator=gen), torch.randn(B, 2, S, 16, generator=gen)
    k_ring, v_ring = ring_of(k_own, cache_len, W), ring_of(v_own, cache_len, W)
    got = torch.ops.hysparse.FullAttentionDecode(q, k, v, cache_len, 16, 32, 0.25)
    want_out, want_indices = full_decode(q, k, v, cache_len, 16, 32, 0.25)
    assert got[1].dtype == torch.int32 and torch.equal(got[1].long(), want_indices)
    assert rel_err(got[0], want_out) <= 1e-5
    (out_shape, _), (idx_shape, _) = trt_export.full_attention_shapes(q.shape, k.shape, 16, 32)
    assert (tuple(got[0].shape), tuple(got[1].shape)) == (out_shape, idx_shape) == ((B, 4, 1, 16), (B, 2, 1, 2))
    indices = got[1]
    gate, sinks = torch.rand(B, 4, 1, 16, generator=gen), torch.randn(4, generator=gen)
    gate_swa, ones = torch.rand(B, 4, 1, 1, generator=gen), torch.ones(1, 1, 1, 1)
    inputs = (q, k_ring, v_ring, k, v, indices, cache_len, gate, gate_swa, sinks)
    got = torch.ops.hysparse.SparseAttentionDecode(*inputs, 16, 8, 0.25, 0, 1, 1, 1)
    assert rel_err(got, sparse_decode(q, k_ring, v_ring, k, v, indices, cache_len, 16, 8, gate, gate_swa, sinks,
                                      0.25)) <= 1e-5
    got = torch.ops.hysparse.SparseAttentionDecode(q, k_ring, v_ring, k, v, indices, cache_len, ones, ones,
                                                   torch.full((4,), float("-inf")), 16, 8, 0.25, 1, 0, 0, 0)
    assert rel_err(got, sparse_decode(q, k_ring, v_ring, k, v, indices, cache_len, 16, 8, merge=True)) <= 1e-5
    with FakeTensorMode():
        fake = torch.ops.hysparse.SparseAttentionDecode(*(torch.empty(x.shape, dtype=x.dtype) for x in inputs), 16, 8,
                                                        0.25, 0, 1, 1, 1)
    assert (tuple(fake.shape), "like q") == trt_export.sparse_attention_shapes(q.shape)[0]


def test_decode_graphs_for_tensorrt_name_the_decode_plugins_and_get_profiles(tmp_path):
    """The plugin-ready ONNX pair (via='onnx', decode=True) and the Torch-TensorRT capture of the decode step: its
    inputs' optimization profiles make batch and the full layers' cached length dynamic, nothing else."""
    from hysparse_compile.export import onnx_decode

    result = to_tensorrt(sharp_llama(), example_ids(1, 40), tmp_path / "m.onnx", via="onnx", decode=True, check=False)
    assert [f.name for f in result.files] == ["m.onnx", "m-decode.onnx"]
    for f in result.files:  # captured from a batch-1 example, the batch axis of every input stays symbolic
        for graph_input in onnx.load(str(f)).graph.input:
            batch = graph_input.type.tensor_type.shape.dim[0]
            assert batch.dim_param and not batch.HasField("dim_value"), (f.name, graph_input.name)
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
