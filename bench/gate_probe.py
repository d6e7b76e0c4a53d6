"""Which sigmoid the sparse layers' gates take on this torch: `hysparse::gate_sigmoid` under `torch.compile` with grad
(one saved gate tensor per sparse layer), plain `sigmoid` under `torch.export` (docs/compiler.md, "Under
`torch.compile`, the gates once").

    python -m bench.gate_probe [--device cuda]

Prints the flags Dynamo answers inside a compiled function, whether `gate_sigmoid` reaches Inductor's code for
`graph_ops.branch_gates` alone and for a 4-layer compiled model's forward, and whether it stays out of
`torch.export` graphs (strict and non-strict). Found with it (H100, torch 2.11, 2026-12-06): that torch answers
`torch.compiler.is_exporting()` with True under any `torch.compile`, so the gates took plain `sigmoid` there.
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> None:
    import torch
    import transformers as tf
    from torch._inductor.utils import run_and_get_code

    import hysparse_compile as hs
    from hysparse_compile.graph import graph_ops

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    dev = ap.parse_args(argv).device
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    print(torch.__version__)
    x = torch.randn(1, 256, 512, device=dev, dtype=dtype, requires_grad=True)
    w = torch.randn(2 * 8 * 64, 512, device=dev, dtype=dtype, requires_grad=True)

    def gates(x, w):
        gs, gw = graph_ops.branch_gates(x, w, 8, 2)
        flags = [torch.compiler.is_compiling(), torch.compiler.is_exporting(), torch.is_grad_enabled(),
                 x.requires_grad, w.requires_grad]
        return gs.float().sum() + gw.float().sum(), torch.tensor([float(v) for v in flags], device=x.device)

    (_, flags), codes = run_and_get_code(lambda: torch.compile(gates)(x, w))
    print("compiling, exporting, grad, x.requires_grad, w.requires_grad:", flags.tolist())
    print("torch.compile, branch_gates alone: gate_sigmoid in code:", any("gate_sigmoid" in c for c in codes))

    class Gates(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(w.detach().clone())

        def forward(self, x):
            gs, gw = graph_ops.branch_gates(x, self.w, 8, 2)
            return gs + gw

    for strict in (False, True):
        graph = str(torch.export.export(Gates(), (x,), strict=strict).graph)
        print(f"torch.export strict={strict}: gate_sigmoid in graph: {'gate_sigmoid' in graph}, "
              f"sigmoid in graph: {'sigmoid' in graph}")

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
                         attn_implementation="sdpa")
    model = tf.LlamaForCausalLM(cfg).to(dev)
    compiled = hs.compile(model, hs.Schedule.from_pattern("FSSF", block_size=16, topk=32, window=16, mode="paper"))
    ids = torch.randint(0, 128, (1, 64), device=dev)
    fn = torch.compile(compiled)

    def step():
        fn(input_ids=ids).logits.sum().backward()

    _, codes = run_and_get_code(step)
    forward = [c for c in codes if "tangents" not in c]
    print("model: gate_sigmoid in forward code:", any("gate_sigmoid" in c for c in forward),
          "aten.sigmoid nodes:", sum(c.count("aten.sigmoid") for c in forward))


if __name__ == "__main__":
    sys.exit(main())
