"""What is live at the peak of one call: the end-to-end model of bench_e2e.py under each way it is run, with the
CUDA allocator's history recorded, replayed to its highest point, and the largest live allocations listed with the
Python frames that made them.

    python -m bench.memory_peak --seqlen 32k --modes compile        # torch.compile(compiled): 9.99 GiB vs 6.10 eager
    python -m bench.memory_peak --seqlen 8k --modes eager,compile --model original
    python -m bench.memory_peak --seqlen 8k --modes compile --model both --backward   # one training step each

`--model original` runs its compiled mode as bench_e2e's `compile[causal]` (the original at its best: the whole
model compiled with SDPA kept causal, no mask). `--backward` records a training step from no grads (loss =
logits.sum(), as bench_e2e's fwd+bwd rows) instead of a no-grad forward, and also lists every block live at the peak,
grouped by phase (allocated before or after a marker allocation between the forward and the backward), site and
block size.

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


def user_frames(e: dict) -> list[dict]:
    """An allocation's Python frames outside torch's own files, innermost first (the snapshot's C++ frames, `??` or
    `.cpp` files, came first and filled the depth in the run of 2026-12-05 h)."""
    return [f for f in e.get("frames", []) if f.get("filename", "").endswith(".py") and "/torch/" not in f["filename"]]


def where(e: dict, depth: int = 4) -> str:
    """The innermost `depth` of `user_frames`, as `file:line function <- ...`."""
    frames = user_frames(e)
    return " <- ".join(f"{f['filename'].rsplit('/', 1)[-1]}:{f['line']} {f['name']}" for f in frames[:depth]) or "?"


def backward_starts(device) -> None:
    """A marker in the allocator's trace between a step's forward and its backward (its frame names it)."""
    import torch

    torch.empty(1, device=device)


def marker_index(trace: list[dict]) -> int:
    """Index of `backward_starts`'s allocation in the trace (len(trace) when absent: all forward)."""
    for i, e in enumerate(trace):
        if e["action"] == "alloc" and any(f.get("name") == "backward_starts" for f in e.get("frames", [])):
            return i
    return len(trace)


def grouped(trace: list[dict], live: list[dict]) -> list[tuple[str, str, int, int, str]]:
    """(phase, site, block bytes, blocks, example) of the live allocations summed by phase (forward / backward:
    before or after the marker; the autograd engine's own allocations carry no Python frame), site (the innermost
    frame's file and function, its line dropped: an Inductor graph allocates every buffer on its own line) and block
    size, largest total first; `example` is one block's line and, where the file is readable, its source text."""
    import linecache

    at = marker_index(trace)
    index = {id(e): i for i, e in enumerate(trace)}
    sums: dict[tuple[str, str, int], list] = {}
    for e in live:
        frame = next(iter(user_frames(e)), None)
        site = f"{frame['filename'].rsplit('/', 1)[-1]} {frame['name']}" if frame else "?"
        key = ("backward" if index[id(e)] > at else "forward", site, e["size"])
        if key not in sums:
            text = linecache.getline(frame["filename"], frame["line"]).strip()[:90] if frame else ""
            sums[key] = [0, f"line {frame['line']}: {text}" if frame else ""]
        sums[key][0] += 1
    rows = [(k[0], k[1], k[2], v[0], v[1]) for k, v in sums.items()]
    return sorted(rows, key=lambda r: -r[2] * r[3])


def main(argv=None) -> None:
    import torch

    from . import bench_e2e as be
    from . import kernel_options

    ap = argparse.ArgumentParser()
    ap.add_argument("--seqlen", default="32k", help="8k, 32k, 128k or a number of tokens")
    ap.add_argument("--modes", default="eager,compile", help="eager and/or compile (torch.compile of the whole model)")
    ap.add_argument("--model", default="compiled", choices=["compiled", "original", "both"])
    ap.add_argument("--backward", action="store_true", help="a training step (forward + backward) from no grads")
    ap.add_argument("--top", type=int, default=12)
    kernel_options.add_inductor_argument(ap)
    args = ap.parse_args(argv)
    kernel_options.inductor_config(args.inductor)
    T = int(args.seqlen[:-1]) * 1024 if args.seqlen.endswith("k") else int(args.seqlen)
    device, dtype = torch.device("cuda"), torch.bfloat16
    model, compiled, _ = be.build(False, device, dtype, "triton")
    ids = torch.randint(0, be.model_config(False)["vocab_size"], (1, T), device=device)
    for name in (("original", "compiled") if args.model == "both" else (args.model,)):
        for mode in args.modes.split(","):
            report(args, name, mode, model if name == "original" else compiled, ids, T)
            torch._dynamo.reset()


def report(args, name: str, mode: str, target, ids, T: int) -> None:
    import contextlib

    import torch

    from . import original_best

    gib = 1 << 30
    fn = torch.compile(target, dynamic=True) if mode == "compile" else target
    kw = {} if name == "compiled" else {"use_cache": False}
    ctx = contextlib.nullcontext()
    if name == "original" and mode == "compile":  # bench_e2e's compile[causal]: SDPA causal, no mask
        original_best.register()
        ctx = original_best.attention(original_best.configs_of(target), original_best.CAUSAL)
        mode = "compile[causal]"
    params = [p for p in target.parameters() if p.requires_grad]

    def call():
        out = fn(input_ids=ids, **kw).logits
        if args.backward:
            loss = out.sum()
            backward_starts(ids.device)
            loss.backward()
            for p in params:
                p.grad = None
        return out

    with ctx, (contextlib.nullcontext() if args.backward else torch.no_grad()):
        call()  # compile and warm up outside the recording
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        torch.cuda.memory._record_memory_history(max_entries=400_000, stacks="python")
        out = call()
        torch.cuda.synchronize()
        snap = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
    del out
    trace = snap["device_traces"][torch.cuda.current_device()]
    peak, live = live_at_peak(trace)
    what = "fwd+bwd" if args.backward else "forward"
    index = {id(e): i for i, e in enumerate(trace)}
    if args.backward and live:
        what += ", peak in the " + ("backward" if max(index[id(e)] for e in live) > marker_index(trace) else "forward")
    print(f"\n## {name} {mode} {what}, T={T}: max_memory_allocated {torch.cuda.max_memory_allocated() / gib:.2f} "
          f"GiB ({base / gib:.2f} before the call); the call's own peak {peak / gib:.2f} GiB, "
          f"{len(live)} blocks live there")
    print("| MiB | bytes per token | allocated at |\n|---|---|---|")
    for e in live[:args.top]:
        print(f"| {e['size'] / 2**20:.1f} | {e['size'] / T:.0f} | {where(e)} |")
    if args.backward:
        print("\n| phase | allocated in | MiB per block | blocks | MiB | bytes per token | e.g. |\n"
              "|---|---|---|---|---|---|---|")
        for ph, site, size, n, example in grouped(trace, live):
            print(f"| {ph} | {site} | {size / 2**20:.1f} | {n} | {n * size / 2**20:.1f} | {n * size / T:.0f} | "
                  f"{example.replace('|', '/')} |")

if __name__ == "__main__":
    main()
