"""Logit soft-capping and full-layer sinks (two op parameters the compiler can hand the ops) through everything below
the compiler: a compiled model whose graph is given them (as the rewrite would emit them: `softcap=` on every
attention node, `sinks=` on the full layer) prefills, decodes and extends through its cache exactly as its
full-sequence forward computes, and every export format writes and runs them: standard ONNX (the decompositions),
custom-domain ONNX (`softcap` attribute, the full node's optional `sinks` input), the TensorRT plugins' twins and
plugin-ready file, and the AOTInductor `triton_op`s. Oracle: tests/oracle.py (independent of the package)."""
import copy
import functools
import os
import re

import onnx
import pytest
import torch
from exportable import example_ids, sharp_pair
from oracle import oracle_full, oracle_sparse, random_indices, rel_err

import hysparse_compile as hs
from hysparse_compile.export import onnx_custom, to_onnx
from hysparse_compile.export import tensorrt as trt_export
from hysparse_compile.runtime import layers
from hysparse_compile.runtime.cache import HySparseCache

CAP = 2.0


@functools.lru_cache(maxsize=None)
def capped_model(softcap=CAP, full_sinks=True):
    """sharp_llama (FS, paper mode) with `softcap` on both layers and learned-looking sinks on the full layer."""
    compiled = copy.deepcopy(sharp_pair("FS")[1])
    gm = compiled.graph_module
    attn = compiled.get_submodule("model.layers.0.self_attn")
    attn.register_parameter("sinks", torch.nn.Parameter(torch.randn(4, generator=torch.Generator().manual_seed(3))))
    for node in gm.graph.nodes:
        if node.target in (layers.full_layer, layers.sparse_layer):
            node.kwargs = {**node.kwargs, "softcap": softcap}
        if node.target is layers.full_layer and full_sinks:
            with gm.graph.inserting_before(node):
                sinks = gm.graph.get_attr("model.layers.0.self_attn.sinks")
            node.kwargs = {**node.kwargs, "sinks": sinks}
    gm.recompile()
    return compiled


def _logits(out):
    return out if isinstance(out, torch.Tensor) else out.logits


def test_the_parameters_reach_the_ops_and_change_the_output():
    ids = example_ids(2, 40)
    with torch.no_grad():
        plain = _logits(sharp_pair("FS")[1](ids))
        capped = _logits(capped_model()(ids))
        capped_only = _logits(capped_model(full_sinks=False)(ids))
    assert rel_err(capped, plain) > 1e-2 and rel_err(capped, capped_only) > 1e-3


def test_cached_prefill_decode_and_extend_equal_the_full_forward():
    compiled = capped_model()
    ids = example_ids(2, 45, seed=4)
    with torch.no_grad():
        want = _logits(compiled(ids))
        cache, got, t = HySparseCache(compiled), [], 0
        for n in (23, 1, 1, 5, 1, 14):  # across 16-token blocks and the 16-token window; extend longer than it
            got.append(_logits(compiled(ids[:, t:t + n], past_key_values=cache, use_cache=True)))
            t += n
    assert rel_err(torch.cat(got, 1), want) < 1e-4


@pytest.mark.parametrize("ops", ["standard", "custom"])
def test_onnx_prefill_and_decode_files_run_the_parameters(tmp_path, ops):
    """The exporter's own check runs both files on the example (onnxruntime / onnx.reference + Python ops) against
    the compiled model; here the custom nodes also carry the parameters."""
    result = to_onnx(capped_model(), example_ids(2, 40), tmp_path / "m.onnx", ops=ops, decode=True)
    assert result.check.count("checker ok") == 2 and "max rel err" in result.check
    errs = [float(x) for x in re.findall(r"max rel err ([0-9.e+-]+)", result.check)]
    assert len(errs) == 2 and max(errs) < 1e-4, result.check
    if ops == "custom":
        for f in result.files[:2]:
            nodes = [n for n in onnx.load(str(f)).graph.node if n.domain == "hysparse"]
            attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nodes]
            assert all(a["softcap"] == CAP for a in attrs)
            full = [n for n in nodes if n.op_type.startswith("FullAttention")]
            assert full and all(len(n.input) == (5 if "Decode" in n.op_type else 4) for n in full)  # + sinks


def test_tensorrt_file_names_the_sinks_plugins_and_the_twins_compute_the_oracle(tmp_path):
    result = to_onnx(capped_model(), example_ids(2, 40), tmp_path / "m.onnx", ops="custom", check=False)
    model = onnx.load(str(result.path))
    trt_export.plugin_onnx(model)
    types = sorted(n.op_type for n in model.graph.node if n.domain == "hysparse")
    assert types == ["FullAttentionSinks", "SparseAttention"]
    onnx.checker.check_model(model, full_check=True)
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, h, 45, 16, generator=gen) for h in (4, 2, 2))
    sinks = torch.randn(4, generator=gen)
    out, idx = torch.ops.hysparse.FullAttentionSinks(q, k, v, sinks, 16, 32, 0.25, CAP)
    o_ref, _, i_ref = oracle_full(q, k, v, 16, 32, 0.25, softcap=CAP, sinks=sinks)
    assert rel_err(out, o_ref) < 1e-5 and torch.equal(idx.long(), i_ref)
    indices = random_indices(2, 2, 45, 16, 2, generator=gen)
    ones = torch.ones(1, 1, 1, 1)
    got = torch.ops.hysparse.SparseAttention(q, k, v, k, v, indices, ones, ones, sinks, 16, 8, 0.25, 0, 0, 0, 1, CAP)
    want = oracle_sparse(q, k, v, k, v, indices, 16, 8, sinks=sinks, scale=0.25, softcap=CAP)
    assert rel_err(got, want) < 1e-5


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the Triton kernels run on a CPU only under TRITON_INTERPRET=1")
def test_aoti_triton_ops_take_softcap_and_full_sinks():
    from hysparse_compile.export import aoti_triton  # noqa: F401  (registers torch.ops.hysparse_aot.*)

    gen = torch.Generator().manual_seed(6)
    T = 37
    q, k, v = (torch.randn(1, h, T, 16, generator=gen) for h in (4, 2, 2))
    sinks = torch.randn(4, generator=gen)
    out, idx = torch.ops.hysparse_aot.full_attention(q, k, v, 16, 32, 0.25, sinks, CAP)
    o_ref, _, i_ref = oracle_full(q, k, v, 16, 32, 0.25, softcap=CAP, sinks=sinks)
    assert rel_err(out, o_ref) < 1e-5 and torch.equal(idx.long(), i_ref)
    gs = torch.rand(1, 4, T, 16, generator=gen)
    got = torch.ops.hysparse_aot.sparse_attention(q, k, v, k, v, idx, gs, None, sinks, 16, 8, 0.25, False, CAP)
    want = oracle_sparse(q, k, v, k, v, idx, 16, 8, gs, None, sinks, 0.25, softcap=CAP)
    assert rel_err(got, want) < 1e-5


def test_custom_node_without_the_new_parameters_is_the_node_it_always_was(custom_file):
    """A layer without softcap or full-layer sinks writes the nodes of before: no `softcap` attribute, three inputs
    (runtimes written against the first schema keep working)."""
    nodes = [n for n in onnx.load(str(custom_file.path)).graph.node if n.domain == "hysparse"]
    assert all("softcap" not in {a.name for a in n.attribute} for n in nodes)
    assert [len(n.input) for n in nodes if n.op_type == "FullAttention"] == [3]
    assert hs.__version__  # the package under test
    assert onnx_custom.DOMAIN == "hysparse"
