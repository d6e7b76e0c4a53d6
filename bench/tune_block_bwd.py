"""The sparse-layer backward's loop orders on one GPU: check block-major against token-major, then time both.

    python -m bench.tune_block_bwd [--seqlens 8192,32768] [--shapes 32/8/128,64/4/128]
        [--selections random,tile] [--sweep] [--budget-s 300] [--out DIR]

bf16, B = 1, block 64, topk 1024, window 128, per-channel gates, sinks (bench_kernels' prefill setup). Per shape, T
and selection: SDPA cuDNN dense backward alone (the forward's output kept), then our backward alone
(`sparse_attention_bwd` with the branch outputs saved, so no recomputation) with order="token" and
order="block"; with --sweep, block-major over tokens per step, entries per program, warps and stages. Before
timing, the block-major gradients are compared with the token-major ones (rel L2, both bf16 kernels; the
token-major path is the one `check_gpu.py` checks against the fp32 reference). Prints a table; writes
tune_block_bwd.json under --out (default $OUT or bench/results). Results: docs/kernels_sparse.md.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import time

import torch


from . import baselines as bl
from .timer import time_ms
from .bench_kernels import random_selection
from hysparse_compile.kernels.triton.sparse_attention import sparse_attention_fwd
from hysparse_compile.kernels.triton.sparse_attention_bwd import sparse_attention_bwd

BS, TOPK, WINDOW = 64, 1024, 128
T0 = time.time()
NAMES = ["dq", "dk_own", "dv_own", "dk_shared", "dv_shared", "dgate_sparse", "dgate_swa", "dsinks"]


def log(msg):
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def inputs(Hq, Hkv, d, T, sel, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16, generator=g)  # noqa: E731
    q = r(1, Hq, T, d)
    ko, vo, ks, vs = (r(1, Hkv, T, d) for _ in range(4))
    gates = torch.sigmoid(r(1, T, Hq, 2 * d)).transpose(1, 2)
    gs, gw = gates[..., :d], gates[..., d:]
    sinks = torch.randn(Hq, device="cuda", generator=g)
    tile_pool = 2 * (TOPK // BS) if sel == "tile" else 0
    idx = random_selection(1, Hkv, T, BS, TOPK // BS, "cuda", g, tile_pool=tile_pool)
    dout = r(1, Hq, T, d)
    return (q, ko, vo, ks, vs, idx, gs, gw, sinks), dout


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seqlens", default="8192,32768")
    ap.add_argument("--shapes", default="32/8/128,64/4/128")
    ap.add_argument("--selections", default="random,tile")
    ap.add_argument("--sweep", action="store_true", help="block-major knobs: tok, chunk, num_warps, num_stages")
    ap.add_argument("--budget-s", type=float, default=300.0)
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    dev = torch.device("cuda")
    rows = []
    log(f"{torch.cuda.get_device_name()} torch {torch.__version__}")
    for shape, T, sel in itertools.product(args.shapes.split(","), map(int, args.seqlens.split(",")),
                                           args.selections.split(",")):
        if time.time() - T0 > args.budget_s:
            log(f"budget spent: skip {shape} T={T} {sel}")
            continue
        Hq, Hkv, d = map(int, shape.split("/"))
        a, dout = inputs(Hq, Hkv, d, T, sel)
        scale = d ** -0.5
        meta = (BS, WINDOW, scale, False)
        out, lse, br = sparse_attention_fwd(*a, *meta, True, order="token")
        bwd = lambda order, kn=None: sparse_attention_bwd(dout, *a, out, lse, br, *meta, order=order,  # noqa
                                                          block_major=kn)
        tok_g, blk_g = bwd("token"), bwd("block")
        errs = {n: rel(x, y) for n, x, y in zip(NAMES, blk_g, tok_g) if y is not None}
        worst = max(errs.values())
        log(f"{shape} T={T} {sel}: block vs token rel L2 {worst:.2e} ({errs})")
        leaves = tuple(x.detach().requires_grad_() for x in (a[0], a[3], a[4]))
        fb, to_none = bl.sdpa_call("cudnn", bl.Rotor([(*leaves, dout)]), True)
        dense_fb = time_ms(fb, dev, grad_to_none=to_none)  # cuDNN backward alone: its fwd+bwd minus its fwd
        dense_f = time_ms(bl.sdpa_call("cudnn", bl.Rotor([(*leaves, dout)]), False)[0], dev)
        base = dict(shape=shape, T=T, selection=sel, cudnn_bwd_ms=dense_fb - dense_f, block_vs_token=worst)
        variants = [("token", None), ("block", None)]
        if args.sweep:
            G = Hq // Hkv
            for tok_rows, chunk_steps, nw, ns in itertools.product((64, 128), (8, 16, 32), (4, 8), (1, 2)):
                tok = max(1, tok_rows // G)
                variants.append(("block", dict(tok=tok, chunk=chunk_steps * tok, num_warps=nw, num_stages=ns)))
        for order, kn in variants:
            if time.time() - T0 > args.budget_s:
                break
            try:
                ms = time_ms(lambda: bwd(order, kn), dev)
            except Exception as e:  # noqa: BLE001 - a knob set that does not compile (registers) is a result
                rows.append(dict(base, order=order, knobs=kn, ms=None, error=f"{type(e).__name__}: {e}"[:200]))
                log(f"  {order} {kn}: {type(e).__name__}")
                continue
            rows.append(dict(base, order=order, knobs=kn, ms=ms, x_cudnn=base["cudnn_bwd_ms"] / ms))
            log(f"  {order:5s} {kn or 'default'}: {ms:.3f} ms  ({base['cudnn_bwd_ms'] / ms:.2f}x cuDNN bwd "
                f"{base['cudnn_bwd_ms']:.3f} ms)")
        del a, dout, out, lse, br, tok_g, blk_g
        torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "tune_block_bwd.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), f, indent=1)
    print("\n| shape | T | selection | cuDNN bwd ms | token ms | block ms (default) | best block ms | knobs |")
    print("|---|---|---|---|---|---|---|---|")
    for key in sorted({(r["shape"], r["T"], r["selection"]) for r in rows}):
        rs = [r for r in rows if (r["shape"], r["T"], r["selection"]) == key and r["ms"]]
        tok = [r["ms"] for r in rs if r["order"] == "token"]
        blk = [r for r in rs if r["order"] == "block"]
        dflt = [r["ms"] for r in blk if r["knobs"] is None]
        best = min(blk, key=lambda r: r["ms"]) if blk else None
        print(f"| {key[0]} | {key[1]} | {key[2]} | {rs[0]['cudnn_bwd_ms']:.2f} | {tok[0] if tok else float('nan'):.2f}"
              f" | {dflt[0] if dflt else float('nan'):.2f} | {best['ms'] if best else float('nan'):.2f} | "
              f"{best['knobs'] if best else ''} |")


if __name__ == "__main__":
    main()
