"""Where the sparse layer's forward time goes, kernel by kernel, for each loop order (and each kernel's registers
and spills as compiled on this GPU).

    python -m bench.profile_sparse --shape 32/8/128 --seqlen 32768 --selection random --orders block,token
    python -m bench.profile_sparse --orders block --variants '[{}, {"block_major": {"tok": 32}}, {"num_warps": 4}]'

`--variants`: a JSON list of keyword sets for `sparse_attention_fwd` (its tuning knobs), each profiled per order;
each variant's output is compared with the first one's (relative L2; "DISAGREES" past 1e-2).
"""
from __future__ import annotations

import argparse
import json
import math
from types import SimpleNamespace

import torch

from .bench_kernels import make_prefill, random_selection
from .timer import kernel_times


def inputs(Hq, Hkv, d, T, selection, seed=0, device="cuda"):
    """bench_kernels' prefill inputs (bf16, B = 1, per-channel gates, sinks) and a selection of 16 blocks of 64."""
    dev = torch.device(device)
    s = make_prefill(SimpleNamespace(device=dev, dtype=torch.bfloat16), Hq, Hkv, d, T, seed)
    g = torch.Generator(device=dev).manual_seed(seed + 1)
    idx = random_selection(1, Hkv, T, 64, 16, dev, g, tile_pool=32 if selection == "tile" else 0)
    return s, idx


def compiled_stats():
    """(kernel, n_regs, n_spills, shared bytes) of every Triton kernel compiled so far in this process."""
    from hysparse_compile.kernels.triton import block_major, sparse_attention
    rows = []
    for mod in (block_major, sparse_attention):
        for name in dir(mod):
            fn = getattr(mod, name)
            caches = getattr(fn, "device_caches", None)
            if not caches:
                continue
            for dev_cache in caches.values():
                for k in dev_cache[0].values():
                    rows.append((name, getattr(k, "n_regs", None), getattr(k, "n_spills", None),
                                 getattr(getattr(k, "metadata", None), "shared", None),
                                 getattr(getattr(k, "metadata", None), "num_warps", None)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="32/8/128")
    ap.add_argument("--seqlen", type=int, default=32768)
    ap.add_argument("--selection", default="random", choices=["random", "tile"])
    ap.add_argument("--orders", default="block,token")
    ap.add_argument("--variants", default="[{}]", help="JSON list of sparse_attention_fwd keyword sets")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    from hysparse_compile.kernels.triton.sparse_attention import sparse_attention_fwd
    Hq, Hkv, d = (int(x) for x in args.shape.split("/"))
    s, idx = inputs(Hq, Hkv, d, args.seqlen, args.selection)
    a = (s["q"], s["k_own"], s["v_own"], s["k_sh"], s["v_sh"], idx, s["gate_sp"], s["gate_swa"], s["sinks"], 64, 128,
         1 / math.sqrt(d), False, False)
    print(f"# {torch.cuda.get_device_name()} {args.shape} T={args.seqlen} {args.selection}")
    first = None
    for order in args.orders.split(","):
        for kw in json.loads(args.variants):
            out = sparse_attention_fwd(*a, order=order, **kw)[0].float()
            first = out if first is None else first
            agree = ((out - first).norm() / first.norm()).item()  # every variant computes the same layer
            rows = kernel_times(lambda: sparse_attention_fwd(*a, order=order, **kw), width=70)
            total = sum(t for _, t, _ in rows)
            print(f"\n## order={order} {json.dumps(kw)}: {total:.3f} ms of kernels per call; out vs the first "
                  f"variant's: relative L2 {agree:.2e}{'' if agree < 1e-2 else ' DISAGREES'}")
            print("| kernel | ms/call | launches/call |\n|---|---|---|")
            for n, t, c in rows[:args.top]:
                print(f"| {n} | {t:.4f} | {c} |")
    print("\n| triton kernel | regs | spills | shared B | warps |\n|---|---|---|---|---|")
    for r in compiled_stats():
        print("| " + " | ".join(str(x) for x in r) + " |")


if __name__ == "__main__":
    main()
