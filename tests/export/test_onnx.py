"""to_onnx: standard ops run in onnxruntime and match PyTorch at other batches and lengths (one file); the custom
domain runs with Python implementations of its two nodes and matches too; bad arguments fail clearly, leaving
nothing behind."""
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from exportable import BLOCK, TOPK, WINDOW, example_ids, hf_positions, padded_batch, sharp_llama

from hysparse_compile import functional as F
from hysparse_compile.export import onnx_custom, onnx_standard, program, to_onnx

DOCS = Path(__file__).resolve().parents[2] / "docs" / "onnx_ops.md"


def reference_logits(ids, mask=None, positions=None):
    with torch.no_grad():
        return sharp_llama()(input_ids=ids, attention_mask=mask, position_ids=positions).logits


def rel(got, want):
    return program.relative_error(got, want)


# ---------------------------------------------------------------------------------------------- standard ops
def test_standard_files_pass_the_full_checker_and_have_only_standard_ops(standard_file):
    prefill, decode = standard_file.files
    assert decode.name == "llama-decode.onnx"
    cache = ["lengths", "0.key", "0.value", "1.key", "1.value"]  # layer 0 full (K/V), layer 1 sparse (its ring)
    for path, inputs, outputs in (
            (prefill, ["input_ids", "attention_mask", "position_ids"], ["logits"] + [f"present.{c}" for c in cache]),
            (decode, ["input_ids"] + [f"past.{c}" for c in cache], ["logits"] + [f"present.{c}" for c in cache])):
        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=True)
        assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
        assert [i.name for i in model.graph.input] == inputs
        assert [o.name for o in model.graph.output] == outputs
    assert standard_file.ops["TopK"] >= 1 and standard_file.check.count("checker ok") == 2


@pytest.mark.parametrize("seq, pad", [(77, 5), (1000, 0)])
def test_one_standard_file_serves_other_batches_and_lengths(standard_file, seq, pad):
    ids, mask = padded_batch(seq, pad) if pad else (example_ids(1, seq, seed=3), torch.ones(1, seq, dtype=torch.long))
    positions = torch.arange(seq).expand_as(ids)
    feed = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
    got = onnx_standard.run_onnxruntime(standard_file.path, feed)
    assert rel(got, reference_logits(ids, mask, positions)) <= 1e-4


def test_greedy_generation_in_onnxruntime_gives_the_tokens_of_compiled_generate(standard_file):
    """Prefill, then one decode-step call per token, the cache passed from each call's outputs to the next one's
    inputs, a left-padded batch: the tokens of `compiled.generate` (transformers' greedy search on the compiled
    model, with its own KV cache)."""
    import onnxruntime as ort

    ids, mask = padded_batch(30, 4, seed=7)
    new = 20  # 30 + 20 tokens: crosses block boundaries (16) and wraps the SWA ring (16 slots)
    with torch.no_grad():
        want = sharp_llama().generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False)[:, 30:]
    prefill, decode = (ort.InferenceSession(str(f), providers=["CPUExecutionProvider"]) for f in standard_file.files)
    outs = prefill.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
                              "position_ids": hf_positions(mask).numpy()})
    names = [o.name.replace("present.", "past.") for o in decode.get_outputs()][1:]
    tokens = []
    for _ in range(new):
        tokens.append(outs[0][:, -1].argmax(-1)[:, None])
        outs = decode.run(None, {"input_ids": tokens[-1], **dict(zip(names, outs[1:]))})
    np.testing.assert_array_equal(np.concatenate(tokens, 1), want.numpy())
    assert outs[1].tolist() == [30 + new, 30 - 4 + new]  # present.lengths: real tokens cached per row


class _FullLayer(torch.nn.Module):
    def forward(self, q, k, v):
        return F.full_attention(q, k, v, block_size=BLOCK, topk=TOPK)


def test_selections_in_onnxruntime_equal_pytorch_ties_included(tmp_path, gen):
    """The op alone through the same path (standard decomposition, our TopK translation): indices are identical,
    and with q = 0 (every candidate block ties) both pick the lowest blocks."""
    from torch.export import Dim

    q, k, v = torch.randn(2, 4, 50, 16, generator=gen), torch.randn(2, 2, 50, 16, generator=gen), \
        torch.randn(2, 2, 50, 16, generator=gen)
    dims = tuple({0: Dim("B", min=1), 2: Dim("T", min=1)} for _ in range(3))
    with program.replace_ops(onnx_standard.replacements()):
        ep = torch.export.export(_FullLayer(), (q, k, v), dynamic_shapes=dims, strict=False)
    path = tmp_path / "full.onnx"
    torch.onnx.export(ep, (), str(path), dynamo=True, custom_translation_table=dict(onnx_standard.TRANSLATIONS),
                      input_names=["q", "k", "v"])
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for T, zero in ((1000, False), (77, True)):
        q, k, v = (torch.randn(1, h, T, 16, generator=gen) for h in (4, 2, 2))
        q = q * 0 if zero else q
        out, indices = session.run(None, {"q": q.numpy(), "k": k.numpy(), "v": v.numpy()})
        want_out, want_indices = _FullLayer()(q, k, v)
        assert indices.dtype == np.int32
        np.testing.assert_array_equal(indices, want_indices.numpy())
        assert rel(torch.from_numpy(out), want_out) <= 1e-5


# ---------------------------------------------------------------------------------------------- custom domain
def test_custom_file_has_one_node_per_op_with_the_documented_schema(custom_file):
    model = onnx.load(str(custom_file.path))
    onnx.checker.check_model(model, full_check=True)
    assert {(o.domain, o.version) for o in model.opset_import} >= {("hysparse", 1)}
    nodes = [n for n in model.graph.node if n.domain == "hysparse"]
    assert sorted(n.op_type for n in nodes) == ["FullAttention", "SparseAttention"]
    attrs = {n.op_type: {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nodes}
    assert attrs["FullAttention"] == {"block_size": BLOCK, "topk": TOPK, "scale": 0.25}
    assert attrs["SparseAttention"] == {"block_size": BLOCK, "window": WINDOW, "scale": 0.25, "merge": 0,
                                        "has_gate_sparse": 1, "has_gate_swa": 1, "has_sinks": 1}
    full, sparse = (next(n for n in nodes if n.op_type == t) for t in ("FullAttention", "SparseAttention"))
    assert len(full.input) == 3 and len(full.output) == 2 and len(sparse.input) == 9 and len(sparse.output) == 1
    assert full.output[1] == sparse.input[5]  # the indices edge
    docs = DOCS.read_text()
    for name in (*attrs["FullAttention"], *attrs["SparseAttention"], *onnx_custom.SPARSE_INPUTS):
        assert f"`{name}`" in docs, f"docs/onnx_ops.md does not document {name!r}"


def test_custom_decode_graphs_generate_the_tokens_of_compiled_generate(custom_file):
    """The custom-domain prefill + decode-step files (FullAttentionDecode / SparseAttentionDecode nodes), run by
    `onnx.reference` with the Python ops in a greedy loop on a left-padded batch: `compiled.generate`'s tokens."""
    prefill, decode = custom_file.files[0], custom_file.files[-1]
    assert decode.name == "llama-custom-decode.onnx" and custom_file.check.count("checker ok") == 2
    ops = {n.op_type for n in onnx.load(str(decode)).graph.node if n.domain == "hysparse"}
    assert ops == {"FullAttentionDecode", "SparseAttentionDecode"}
    docs = DOCS.read_text()
    for name in (*ops, *onnx_custom.SPARSE_DECODE_INPUTS, "k_cache", "v_cache"):
        assert f"`{name}`" in docs or f"hysparse::{name}`" in docs, f"docs/onnx_ops.md does not document {name!r}"
    ids, mask = padded_batch(30, 4, seed=7)
    new = 18  # crosses a 16-token block boundary and wraps the 16-slot SWA ring
    with torch.no_grad():
        want = sharp_llama().generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False)[:, 30:]
    outs = onnx_custom.run_reference_evaluator(prefill, {"input_ids": ids, "attention_mask": mask,
                                                         "position_ids": hf_positions(mask)}, all_outputs=True)
    session = onnx_custom.reference_session(decode)
    names = [n.replace("present.", "past.") for n in session.output_names][1:]
    tokens = []
    for _ in range(new):
        tokens.append(outs[0][:, -1].argmax(-1, keepdim=True))
        feed = {"input_ids": tokens[-1].numpy(), **{n: x.numpy() for n, x in zip(names, outs[1:])}}
        outs = [torch.from_numpy(x) for x in session.run(None, feed)]
    assert torch.equal(torch.cat(tokens, 1), want)


def test_custom_file_runs_with_python_ops_and_matches_pytorch(custom_file):
    assert "onnx.reference" in custom_file.check
    ids, mask = padded_batch(77, 6)
    positions = torch.arange(77).expand_as(ids)
    feed = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
    got = onnx_custom.run_reference_evaluator(custom_file.path, feed)  # the prefill file (it also returns the cache)
    assert rel(got, reference_logits(ids, mask, positions)) <= 1e-4


def test_sparse_node_fillers_are_neutral(gen):
    """Absent gates (ones) and sinks (-inf) give the op's result whether a runtime honours the flags or not."""
    q, k, v = (torch.randn(1, h, 40, 16, generator=gen) for h in (4, 2, 2))
    indices = F.full_attention(q, k, v, block_size=16, topk=32)[1]
    want = F.sparse_attention(q, k, v, k, v, indices, block_size=16, window=8)
    inputs, flags = onnx_custom.sparse_inputs(q, k, v, k, v, indices, None, None, None)
    assert flags == {"has_gate_sparse": 0, "has_gate_swa": 0, "has_sinks": 0}
    attrs = dict(block_size=16, window=8, scale=0.25, merge=0)
    torch.testing.assert_close(onnx_custom.run_sparse_attention(*inputs, **attrs, **flags), want)
    torch.testing.assert_close(onnx_custom.run_sparse_attention(*inputs, **attrs), want)  # flags ignored


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, error, words", [
    (dict(ops="plugins"), ValueError, "ops must be 'standard'"),
    (dict(opset=13), ValueError, "opset 13 is too old"),
    (dict(opset="18"), TypeError, "opset must be an int"),
    (dict(decode="yes"), TypeError, "decode must be True or False"),
])
def test_bad_arguments_name_the_argument(tmp_path, kwargs, error, words):
    with pytest.raises(error, match=words):
        to_onnx(sharp_llama(), example_ids(), tmp_path / "m.onnx", **kwargs)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("compiled, inputs, error, words", [
    ("linear", "ids", TypeError, "compiled must be a compiled HySparse model"),
    ("llama", torch.randn(2, 40), ValueError, "example_inputs: 'input_ids' must be integer token ids"),
    ("llama", {"input_ids": None, "labels": 1}, ValueError, r"unknown input\(s\) \['labels'\]"),
    ("llama", {"input_ids": "ids", "attention_mask": torch.ones(2, 3)}, ValueError, "must have the shape"),
    ("llama", torch.full((2, 40), 999), ValueError, "example_inputs do not run through the compiled model"),
    ("llama", [1, 2, 3, 4], ValueError, "positional inputs"),
])
def test_inputs_that_do_not_match_the_model_are_refused(tmp_path, compiled, inputs, error, words):
    model = torch.nn.Linear(2, 2) if compiled == "linear" else sharp_llama()
    if isinstance(inputs, str):
        inputs = example_ids()
    if isinstance(inputs, dict) and inputs.get("input_ids") == "ids":
        inputs = {**inputs, "input_ids": example_ids()}
    with pytest.raises(error, match=words):
        to_onnx(model, inputs, tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


def test_a_failed_export_leaves_nothing_half_written(tmp_path, monkeypatch):
    from hysparse_compile.export import onnx as onnx_module

    def write_then_fail(prog, path, opset):
        path.write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(onnx_module, "_write", write_then_fail)
    monkeypatch.setattr(program, "capture", lambda *args: None)  # (the capture is tested elsewhere; skip its cost)
    with pytest.raises(RuntimeError, match="disk full"):
        to_onnx(sharp_llama(), example_ids(), tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())  # no file, no temporary folder


def test_path_must_be_a_file_in_an_existing_folder(tmp_path):
    with pytest.raises(ValueError, match="is a directory"):
        to_onnx(sharp_llama(), example_ids(), tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        to_onnx(sharp_llama(), example_ids(), tmp_path / "missing" / "m.onnx")
