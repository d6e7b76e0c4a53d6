"""rewrite: the attention calls are gone, one HySparse op per layer, edges are real graph edges."""
import torch

from hysparse_compile.runtime import layers
from models import compiled_pair

aten = torch.ops.aten


def _calls(gm, target):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


def test_eager_attention_is_fully_replaced_no_softmax_or_score_matmul_left():
    gm = compiled_pair("llama-eager")[1]._graph_module
    assert not _calls(gm, aten.softmax.int) and not _calls(gm, aten.matmul.default)
    assert len(_calls(gm, layers.full_layer)) == 1 and len(_calls(gm, layers.sparse_layer)) == 1


def test_sparse_layer_reads_the_full_layers_indices_and_kv_through_graph_edges():
    state = compiled_pair("llama-sdpa", mode="paper")[1]._hysparse_state
    gm = state.gm
    (full,), (sparse,) = _calls(gm, layers.full_layer), _calls(gm, layers.sparse_layer)
    indices = sparse.args[5]
    assert indices.target.__name__ == "getitem" and indices.args == (full, 1)
    assert sparse.args[3] is full.args[1] and sparse.args[4] is full.args[2]  # k_shared / v_shared = full's K/V
    assert sparse.kwargs["gate_sparse"] is not None and sparse.kwargs["sinks"] is not None
    assert sparse.kwargs["scale"] == 0.25 and sparse.kwargs["window"] == 16


def test_training_free_sparse_layer_uses_its_own_kv_merged():
    gm = compiled_pair("qwen2-sdpa")[1]._graph_module
    (sparse,) = _calls(gm, layers.sparse_layer)
    assert sparse.kwargs["merge"] and sparse.kwargs["gate_sparse"] is None and sparse.kwargs["sinks"] is None
    assert sparse.args[1] is sparse.args[3] and sparse.args[2] is sparse.args[4]
