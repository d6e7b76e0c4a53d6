#!/usr/bin/env bash
# 2026-12-06, eighth session, device call 5 (results bench/results/h100_2026-12-06g_*). Call f (Inductor's peak-memory
# reordering off) left 10 [T, 2·Hq·d] blocks live at the peak for 5 sparse layers, and call e's forward code shows
# `aten.sigmoid` where graph_ops.branch_gates should put hysparse::gate_sigmoid under torch.compile with grad (torch
# 2.13 on the CPU does). Which of branch_gates' conditions does torch 2.11 see differently? A probe: the flags inside
# a compiled function, and whether gate_sigmoid reaches Inductor's code, for branch_gates alone and for a 4-layer
# compiled model.
BUDGET_S=${BUDGET_S:-100}; . "$(dirname "$0")/steps.sh"; mkdir -p "$W"
TAIL=20 step gate_probe 90 python - <<'PY'
import sys, torch, transformers as tf
sys.path.insert(0, "tests")
from models import _hf_common
import hysparse_compile as hs
from hysparse_compile.graph import graph_ops
from torch._inductor.utils import run_and_get_code
print(torch.__version__)
x = torch.randn(1, 256, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
w = torch.randn(2 * 8 * 64, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
def f(x, w):
    gs, gw = graph_ops.branch_gates(x, w, 8, 2)
    flags = [torch.compiler.is_compiling(), torch.compiler.is_exporting(), torch.is_grad_enabled(), x.requires_grad,
             w.requires_grad]
    return gs.float().sum() + gw.float().sum(), torch.tensor([float(v) for v in flags], device=x.device)
(_, flags), codes = run_and_get_code(lambda: torch.compile(f)(x, w))
print("compiling, exporting, grad, x.requires_grad, w.requires_grad:", flags.tolist())
print("branch_gates alone: gate_sigmoid in code:", ["gate_sigmoid" in c for c in codes])
torch.manual_seed(0)
model = tf.LlamaForCausalLM(tf.LlamaConfig(**_hf_common(4, 4, 2), head_dim=32, attn_implementation="sdpa")).cuda()
compiled = hs.compile(model, hs.Schedule.from_pattern("FSSF", block_size=16, topk=32, window=16, mode="paper"))
ids = torch.randint(0, 100, (1, 64), device="cuda")
fn = torch.compile(compiled)
def step():
    fn(input_ids=ids).logits.sum().backward()
_, codes = run_and_get_code(step)
fwd = [c for c in codes if "tangents" not in c]
print("model: gate_sigmoid in forward code:", any("gate_sigmoid" in c for c in fwd),
      "aten.sigmoid nodes:", sum(c.count("aten.sigmoid") for c in fwd))
PY
tar -C "$OUT" -czf "$OUT/session.tar.gz" s
