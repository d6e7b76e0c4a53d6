"""bench/graph_breaks.py on the CPU (the harness; the GPU run checks the GPU machine's torch)."""
from bench import graph_breaks


def test_the_bench_model_compiles_to_one_graph(capsys):
    assert graph_breaks.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert "eval: 1 graph(s), 0 break(s)" in out and "train: 1 graph(s), 0 break(s)" in out
