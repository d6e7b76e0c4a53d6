"""See what the compiler did: layer roles, K/V and index edges, the KV plan, and a diagram (DOT and HTML).

Run: python examples/inspect_and_render.py [out_dir]    (default: a fresh temporary directory)
"""
import sys
import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import hysparse_compile as hc

torch.manual_seed(0)
config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                     num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
model = LlamaForCausalLM(config)
schedule = hc.Schedule.hybrid(8, 3, block_size=16, topk=64, window=32)  # F S S S F S S F
compiled = hc.compile(model, schedule, example_inputs=(torch.randint(0, 256, (1, 64)),))

report = hc.inspect(compiled)
print(report)  # roles, edges, KV plan
print(f"{len(report.roles)} layers, {len(report.edges)} edges")

out_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="hysparse_inspect_"))
out_dir.mkdir(parents=True, exist_ok=True)
dot = out_dir / "hysparse.dot"
html = out_dir / "hysparse.html"
dot.write_text(report.to_dot())
html.write_text(report.to_html())
assert dot.read_text().lstrip().startswith(("digraph", "strict digraph")), "not a DOT graph"
print(f"wrote {dot} and {html} (render the DOT with: dot -Tsvg {dot} -o hysparse.svg)")
