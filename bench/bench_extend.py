"""Extend (R new tokens against a filled cache: chunked prefill, speculative verification) per backend, one GPU.

    python -m bench.bench_extend [--cache 32768] [--rs 64,512] [--shapes 32/8/128,64/4/128]
                                 [--backends reference,flex,triton] [--descriptors]

bf16, B = 1, block 64, topk 1024, window 128, per-channel gates, sinks; one full-layer extend (attention + block
scores + selection) and one sparse-layer extend (its selection, the SWA keys read from a linear own cache) per
row. `reference` is the PyTorch path (the naive math in query chunks); every other backend is reported as
`speedup` = reference ms / its ms (issue 22 item 5: >= 5x at R = 512 over a 32k cache). Each backend's output is
checked against the reference's first (`rel_l2`; the full layer's selection as `indices_rows_equal`, the share of
rows equal to the reference's). Timing: `bench.timer.time_ms`. `--smoke`: CPU, tiny sizes, float32,
Triton interpreted. `--descriptors`: the full layer's extend on the prefill forward's descriptor tiles at
every R (by default from `full_attention_extend.EXTEND_DESCRIPTORS_MIN_ROWS` = 512 rows; fewer keep pointer tiles).
Writes `bench_extend.json` to $OUT (default bench/results/).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

from hysparse_compile import functional as F
from .timer import time_ms


def rel_l2(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", type=int, default=32768)
    p.add_argument("--rs", default="64,512")
    p.add_argument("--shapes", default="32/8/128,64/4/128")
    p.add_argument("--backends", default="reference,flex,triton")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--descriptors", action="store_true",
                   help="the full layer's extend on the forward's descriptor tiles (FWD_CONFIG) at every R, not only from "
                        "full_attention_extend.EXTEND_DESCRIPTORS_MIN_ROWS rows")
    args = p.parse_args(argv)
    device, dtype, bs, topk, w = "cuda", torch.bfloat16, 64, 1024, 128
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the Triton kernels are imported (by their first call)
        device, dtype, bs, topk, w = "cpu", torch.float32, 16, 32, 8
        args.cache, args.rs, args.shapes = 96, "5,24", "8/2/16"
    if args.descriptors:
        import importlib
        importlib.import_module("hysparse_compile.kernels.triton.full_attention_extend").EXTEND_DESCRIPTORS_MIN_ROWS = 1
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for shape in args.shapes.split(","):
        Hq, Hkv, d = map(int, shape.split("/"))
        S = args.cache
        r = lambda *s: torch.randn(*s, generator=gen, device=device).to(dtype)  # noqa: E731
        k, v, k_own, v_own = (r(1, Hkv, S, d) for _ in range(4))
        sinks = torch.randn(Hq, generator=gen, device=device)
        win_pos = torch.arange(S, device=device).view(1, S)
        for R in map(int, args.rs.split(",")):
            q = r(1, Hq, R, d)
            gs, gw = torch.sigmoid(r(1, Hq, R, d)), torch.sigmoid(r(1, Hq, R, d))
            start = torch.tensor([S - R], dtype=torch.int32, device=device)

            def full(b):
                return F.full_attention_extend(q, k, v, start, block_size=bs, topk=topk, backend=b)

            ref_full, idx = full("reference")

            def sparse(b):
                return F.sparse_attention_extend(q, k, v, idx, k_own, v_own, win_pos, start, block_size=bs,
                                                 window=w, gate_sparse=gs, gate_swa=gw, sinks=sinks, backend=b)

            ref = {"full": ref_full, "sparse": sparse("reference")}
            base = {}
            for b in args.backends.split(","):
                for op, fn in (("full", lambda: full(b)), ("sparse", lambda: sparse(b))):
                    row = dict(shape=shape, cache=S, R=R, op=op, backend=b)
                    try:
                        with torch.no_grad():
                            out = fn()
                            row["rel_l2"] = rel_l2(out[0] if op == "full" else out, ref[op])
                            if op == "full":  # rows whose selection is the reference's (near ties may differ)
                                row["indices_rows_equal"] = (out[1] == idx).all(-1).float().mean().item()
                            row["ms"] = time_ms(fn, device)
                    except Exception as e:  # recorded, not fatal
                        row["error"] = f"{type(e).__name__}: {e}"[:300]
                    if b == "reference":
                        base[op] = row.get("ms")
                    elif row.get("ms") and base.get(op):
                        row["speedup"] = base[op] / row["ms"]
                    rows.append(row)
                    print(json.dumps({k: (round(x, 4) if isinstance(x, float) else x) for k, x in row.items()}),
                          flush=True)
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                device=torch.cuda.get_device_name() if device == "cuda" else "cpu", torch=torch.__version__,
                command=" ".join(sys.argv), block=bs, topk=topk, window=w, dtype=str(dtype))
    print(f"\n{'shape':<10} {'R':>5} {'op':<7} {'backend':<10} {'ms':>9} {'speedup':>8} {'rel_l2':>9} {'idx_eq':>7}")
    for row in rows:
        print(f"{row['shape']:<10} {row['R']:>5} {row['op']:<7} {row['backend']:<10} "
              f"{row.get('ms', float('nan')):>9.3f} {row.get('speedup', float('nan')):>8.2f} "
              f"{row.get('rel_l2', float('nan')):>9.2e} {row.get('indices_rows_equal', float('nan')):>7.4f} "
              f"{row.get('error', '')}")
    out = os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "bench_extend.json"), "w") as fh:
        json.dump(dict(meta=meta, rows=rows), fh, indent=1)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
