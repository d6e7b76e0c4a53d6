"""Graph breaks of `torch.compile(compiled)` on this machine's torch: the bench's 8-layer model (bench_e2e.build),
forward in eval mode and forward with grad in train mode, through `torch._dynamo.explain`; each break's reason and
the user frames where it happened. The CPU tests (`tests/runtime/test_call_state.py`) assert no breaks on the CPU's
torch; a GPU runs another torch (2.11 here), whose Dynamo may not trace what the newer one does.

    python -m bench.graph_breaks [--seqlen 2048] [--smoke]
"""
from __future__ import annotations

import argparse

import torch

from . import bench_e2e


def explain(compiled, ids, train: bool) -> int:
    compiled.train(train)
    torch._dynamo.reset()
    with torch.set_grad_enabled(train):
        ex = torch._dynamo.explain(compiled)(ids)
    print(f"{'train' if train else 'eval'}: {ex.graph_count} graph(s), {ex.graph_break_count} break(s)", flush=True)
    seen = set()
    for b in ex.break_reasons:
        where = " <- ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}" for f in reversed(b.user_stack[-4:]))
        key = (str(b.reason)[:200], where)
        if key in seen:
            continue
        seen.add(key)
        print(f"  reason: {str(b.reason)[:400]}\n    at: {where}", flush=True)
    return ex.graph_break_count


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--smoke", action="store_true", help="CPU, float32, tiny model, reference backend")
    a = ap.parse_args(argv)
    smoke = a.smoke or not torch.cuda.is_available()
    device = torch.device("cpu" if smoke else "cuda")
    dtype = torch.float32 if smoke else torch.bfloat16
    _, compiled, _ = bench_e2e.build(smoke, device, dtype, "reference" if smoke else "triton")
    ids = torch.randint(0, compiled.config.vocab_size, (1, 64 if smoke else a.seqlen), device=device)
    print(f"torch {torch.__version__}, {device}", flush=True)
    breaks = explain(compiled, ids, False) + explain(compiled, ids, True)
    return 1 if breaks else 0


if __name__ == "__main__":
    raise SystemExit(main())
