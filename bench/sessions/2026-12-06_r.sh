#!/usr/bin/env bash
# Call r of 2026-12-06 (tenth session): a probe, no fix. In call p a test model compiled on the CPU and moved to
# CUDA failed at its first call on torch 2.11: "Tensor device mismatch! Expected: cpu" from an
# aten._assert_tensor_metadata node (graph/portable.py drops those at capture; torch 2.13 on the CPU captures none).
# Where does the node sit, and does it fail without a cache too?
BUDGET_S=${BUDGET_S:-120}; . "$(dirname "$0")/steps.sh"; mkdir -p "$W"
cat > "$W/probe.py" <<'PY'
import sys, torch
sys.path.insert(0, "tests")
import hysparse_compile as hs
from models import build
print(torch.__version__)
for name in ("llama-sdpa", "qwen2-sdpa", "gpt2-sdpa", "nano"):
    m = build(name, layers=2)
    c = hs.compile(m, hs.Schedule.from_pattern("FS", block_size=16, topk=32, window=16))
    found = [(n, node.format_node()[:160]) for n, mod in c.named_modules() if isinstance(mod, torch.fx.GraphModule)
             for node in mod.graph.nodes if node.target == torch.ops.aten._assert_tensor_metadata.default]
    print(name, "assert nodes after compile on the CPU:", len(found))
    for f in found[:4]:
        print("   ", f)
    c = c.to("cuda")
    ids = torch.randint(1, 100, (1, 20), device="cuda")
    for what, kw in (("plain call", {}), ("cached call", {"use_cache": True})):
        try:
            with torch.no_grad():
                if kw:
                    from hysparse_compile.runtime import HySparseCache
                    kw = dict(past_key_values=HySparseCache(c), use_cache=True)
                c(ids, **kw)
            print("   ", what, "on cuda: ok")
        except Exception as e:
            print("   ", what, "on cuda:", type(e).__name__, str(e).splitlines()[0][:200])
PY
TAIL=40 PYTHONPATH=.:tests step probe 100 python "$W/probe.py"
tar -C "$OUT" -czf "$OUT/session.tar.gz" s
