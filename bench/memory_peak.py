"""What is live at the peak of one call: the end-to-end model of bench_e2e.py under each way it is run, with the
CUDA allocator's history recorded, replayed to its highest point, and the largest live allocations listed with the
Python frames that made them.

    python -m bench.memory_peak --seqlen 32k --modes compile        # torch.compile(compiled): 9.99 GiB vs 6.10 eager
    python -m bench.memory_peak --seqlen 8k --modes eager,compile --model original

Why: `torch.compile(compiled)` peaks at 5.59 / 9.99 / 29.54 GiB in the forward at 8k / 32k / 128k against 4.57 /
6.10 / 13.16 eager (H100, 2026-12-05, bench_e2e --sections best): 134 KB more per token at every length, the size of
an fp32 [T, vocab] tensor plus a little. This names it.
"""
from __future__ import annotations

import argparse


def live_at_peak(trace: list[dict]) -> tuple[int, list[dict]]:
    """(peak bytes, the allocations live at the peak, largest first) of an allocator trace (the `device_traces`
    entry of `torch.cuda.memory._snapshot()`: dicts with `action`, `addr`, `size`, `frames`). Bytes count from the
    first event (what was allocated before recording is not seen); a block counts until its free is requested."""
    live: dict[int, dict] = {}
    cur = peak = 0
    peak_at = -1
    for i, e in enumerate(trace):
        if e["action"] == "alloc":
            live[e["addr"]] = e
            cur += e["size"]
            if cur > peak:
                peak, peak_at = cur, i
        elif e["action"] in ("free_requested", "free_completed") and e["addr"] in live:
            cur -= live.pop(e["addr"])["size"]
    live = {}
    for e in trace[:peak_at + 1]:
        if e["action"] == "alloc":
            live[e["addr"]] = e
        elif e["action"] in ("free_requested", "free_completed"):
            live.pop(e["addr"], None)
    return peak, sorted(live.values(), key=lambda e: -e["size"])


def where(e: dict, depth: int = 4) -> str:
    """The innermost `depth` Python frames of an allocation outside torch's own files, innermost first (the
    snapshot's C++ frames, `??` or `.cpp` files, came first and filled the depth in the run of 2026-12-05 h)."""
    frames = [f for f in e.get("frames", []) if f.get("filename", "").endswith(".py")
              and "/torch/" not in f["filename"]]
    return " <- ".join(f"{f['filename'].rsplit('/', 1)[-1]}:{f['line']} {f['name']}" for f in frames[:depth]) or "?"


def main(argv=None) -> None:
    import torch

    from . import bench_e2e as be

    ap = argparse.ArgumentParser()
    ap.add_argument("--seqlen", default="32k", help="8k, 32k, 128k or a number of tokens")
    ap.add_argument("--modes", default="eager,compile", help="eager and/or compile (torch.compile of the whole model)")
    ap.add_argument("--model", default="compiled", choices=["compiled", "original"])
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args(argv)
    T = int(args.seqlen[:-1]) * 1024 if args.seqlen.endswith("k") else int(args.seqlen)
    device, dtype = torch.device("cuda"), torch.bfloat16
    model, compiled, _ = be.build(False, device, dtype, "triton")
    target = compiled if args.model == "compiled" else model
    ids = torch.randint(0, be.model_config(False)["vocab_size"], (1, T), device=device)
    for mode in args.modes.split(","):
        fn = torch.compile(target, dynamic=True) if mode == "compile" else target
        kw = {} if args.model == "compiled" else {"use_cache": False}
        with torch.no_grad():
            fn(input_ids=ids, **kw)  # compile and warm up outside the recording
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            torch.cuda.memory._record_memory_history(max_entries=200_000, stacks="python")
            out = fn(input_ids=ids, **kw)
            torch.cuda.synchronize()
            snap = torch.cuda.memory._snapshot()
            torch.cuda.memory._record_memory_history(enabled=None)
        del out
        trace = snap["device_traces"][torch.cuda.current_device()]
        peak, live = live_at_peak(trace)
        gib = 1 << 30
        print(f"\n## {args.model} {mode}, T={T}: max_memory_allocated {torch.cuda.max_memory_allocated() / gib:.2f} "
              f"GiB ({base / gib:.2f} before the call); the call's own peak {peak / gib:.2f} GiB, "
              f"{len(live)} blocks live there")
        print("| MiB | bytes per token | allocated at |\n|---|---|---|")
        for e in live[:args.top]:
            print(f"| {e['size'] / 2**20:.1f} | {e['size'] / T:.0f} | {where(e)} |")


if __name__ == "__main__":
    main()
