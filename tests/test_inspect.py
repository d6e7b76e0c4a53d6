"""inspect(compiled): roles, edges, per-pass graphs, KV plan, table, DOT / SVG / HTML, debug_dir, logging."""
import logging

import importlib

import torch

import hysparse_compile as hs
from models import compiled_pair, nano_gpt

inspect_module = importlib.import_module("hysparse_compile.report")


def _report():
    return hs.inspect(compiled_pair("llama-sdpa", mode="paper")[1])


def test_report_lists_roles_and_edges_in_layer_order():
    report = _report()
    assert report.roles == ("full", "sparse")
    assert set(report.edges) == {(0, 1, "kv"), (0, 1, "indices")}
    assert [layer.module for layer in report.layers] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]


def test_training_free_report_has_index_edges_only():
    report = hs.inspect(compiled_pair("gpt2-sdpa")[1])
    assert report.edges == ((0, 1, "indices"),)
    assert report.layers[1].merge and not report.layers[1].sinks


def test_report_keeps_the_graph_after_every_pass():
    graphs = _report().graphs
    assert list(graphs) == ["capture", "find_attention", "assign_roles", "rewrite", "plan_memory"]
    assert "scaled_dot_product_attention" in graphs["capture"]
    assert "scaled_dot_product_attention" not in graphs["rewrite"]
    assert "full_layer" in graphs["rewrite"] and "sparse_layer" in graphs["rewrite"]
    assert "roll_rows" in graphs["rewrite"]  # left padding is rolled away around each op


def test_report_carries_the_kv_plan_of_the_model():
    report = _report()
    compiled = compiled_pair("llama-sdpa", mode="paper")[1]
    assert report.kv_plan is compiled.kv_plan
    assert report.kv_plan.num_kv_heads == 2 and report.kv_plan.head_dim == 16


def test_str_is_a_table_with_one_row_per_layer():
    text = str(_report())
    assert "model.layers.1.self_attn" in text and "L0 indices + K/V" in text and "sparse_branch" in text
    assert "KV cache" in text


def test_dot_has_a_node_per_layer_and_coloured_edges():
    dot = _report().to_dot()
    assert dot.startswith("digraph") and 'L0 -> L1 [label="kv"' in dot and 'L0 -> L1 [label="indices"' in dot


def test_svg_falls_back_to_a_built_in_drawing_without_graphviz(monkeypatch):
    monkeypatch.setattr(inspect_module.shutil, "which", lambda name: None)
    svg = _report().to_svg()
    assert svg.startswith("<svg") and svg.count("<rect") == 2 and "kv: L0 -> L1" in svg


def test_html_embeds_the_diagram_and_every_graph():
    page = _report().to_html()
    assert "<svg" in page and page.count("<details>") == 5


def test_debug_dir_gets_every_pass_graph_and_the_report(tmp_path):
    schedule = hs.Schedule.from_pattern("FS", block_size=16, topk=32, window=16)
    hs.compile(nano_gpt(layers=2), schedule, debug_dir=tmp_path / "dbg")
    names = sorted(p.name for p in (tmp_path / "dbg").iterdir())
    assert names == ["00_capture.py", "01_find_attention.py", "02_assign_roles.py", "03_rewrite.py",
                     "04_plan_memory.py", "layers.dot", "layers.svg", "report.html", "report.txt"]
    assert "sparse_layer" in (tmp_path / "dbg" / "03_rewrite.py").read_text()


def test_each_pass_logs_what_it_matched_and_changed(caplog):
    schedule = hs.Schedule.from_pattern("FS", block_size=16, topk=32, window=16)
    with caplog.at_level(logging.INFO, logger="hysparse_compile"):
        hs.compile(nano_gpt(layers=2, seed=1), schedule)
    text = caplog.text
    for needle in ("capture: exported", "find_attention: matched layer 1 (h.1.attn, sdpa)", "assign_roles: layer 1",
                   "rewrite: layer 1 (h.1.attn)", "plan_memory: KV plan"):
        assert needle in text, needle


def test_inspect_rejects_a_plain_module():
    try:
        hs.inspect(torch.nn.Linear(2, 2))
    except TypeError as e:
        assert "returned by hysparse_compile.compile" in str(e)
    else:
        raise AssertionError("inspect accepted a plain module")
