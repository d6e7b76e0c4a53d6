"""Before training: the HySparse ops at the miniature's shape, `backend="auto"` (Triton on CUDA) against the reference,
in bf16 — outputs and gradients of every mode the plan uses. Seconds; `run_all.sh` runs it first.

    python examples/paper_miniature/check_kernels.py                     # GPU shape: T 4096, Hq/Hkv/d 4/1/64
    python examples/paper_miniature/check_kernels.py --context 128 --dtype float16 --batch 1   # CPU (TRITON_INTERPRET=1)

Exits 1 when a relative error (max |a - b| / max |b|) exceeds --tol: the GPU run would train on a broken kernel.
(Why it exists: under the Triton interpreter on CPU the sparse-layer kernel returns garbage in bf16 while fp16 and
fp32 match; the library checked bf16 on an H100, and this confirms it on the machine the plan runs on.)
"""
from __future__ import annotations

import argparse
import sys

import torch

import common
import hysparse_compile as hs
import variants
from common import console

F = hs.functional
MODES = {  # name -> sparse_attention keyword arguments beyond q, K/V, indices (window filled in)
    "paper (sparse_branch)": {"gates": True, "sinks": True},
    "no-swa": {"gates": True, "sinks": True, "window": None},
    "kv-both / kv-none": {"gates": True, "sinks": True, "same_kv": True},
    "training-free merge": {"merge": True},
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def run(backend, q, k, v, k2, v2, gates, sinks, sparse, mode, indices=None):
    """Full layer then sparse layer; returns (full out, indices, sparse out, grads of the leaves). The sparse layer
    reads `indices` when given (both backends then attend to the same blocks, whatever near-ties did)."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, k2, v2, *gates, sinks)]
    q_, k_, v_, k2_, v2_, gs, gw, sk = leaves
    out, idx = F.full_attention(q_, k_, v_, block_size=sparse.block_size, topk=sparse.topk, backend=backend)
    idx = idx if indices is None else indices
    own = (k_, v_) if mode.get("same_kv") else (k2_, v2_)
    window = mode.get("window", sparse.window)
    kwargs = dict(block_size=sparse.block_size, window=window, backend=backend)
    if mode.get("merge"):
        y = F.sparse_attention(q_, own[0], own[1], own[0], own[1], idx, merge=True, **kwargs)
    else:
        y = F.sparse_attention(q_, own[0], own[1], k_, v_, idx, gate_sparse=gs, gate_swa=gw if window else None,
                               sinks=sk, **kwargs)
    ((out.float() ** 2).mean() + (y.float() ** 2).mean()).backward()
    return out, idx, y, [t.grad for t in leaves]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=1)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--backend", default="auto", help="the backend checked against the reference")
    ap.add_argument("--tol", type=float, default=3e-2)
    args = ap.parse_args(argv)
    device, dtype = common.pick_device(args.device), getattr(torch, args.dtype)
    sparse = variants.sparse_settings(args.context)
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, T, d = args.batch, args.heads, args.kv_heads, args.context, args.head_dim

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype)

    q, k, v, k2, v2 = r(B, Hq, T, d), r(B, Hkv, T, d), r(B, Hkv, T, d), r(B, Hkv, T, d), r(B, Hkv, T, d)
    gates = tuple(torch.rand(B, Hq, T, d, generator=g).to(device, dtype) for _ in range(2))
    sinks = torch.zeros(Hq, device=device)  # fp32, as the compiled model's parameter under autocast
    console.print(f"{device} {args.dtype}: B {B}, Hq/Hkv/d {Hq}/{Hkv}/{d}, T {T}, {sparse}; backend {args.backend!r} "
                  f"vs 'reference'")
    worst = 0.0
    for name, mode in MODES.items():
        b = run("reference", q, k, v, k2, v2, gates, sinks, sparse, mode)
        own_idx = F.full_attention(q, k, v, block_size=sparse.block_size, topk=sparse.topk, backend=args.backend)[1]
        a = run(args.backend, q, k, v, k2, v2, gates, sinks, sparse, mode, indices=b[1])
        same_idx = float((own_idx == b[1]).float().mean())
        errs = {"full out": rel(a[0], b[0]), "sparse out": rel(a[2], b[2])}
        for gname, ga, gb in zip(("dq", "dk", "dv", "dk_own", "dv_own", "dgate_sparse", "dgate_swa", "dsinks"),
                                 a[3], b[3]):
            if gb is not None and ga is not None and gb.abs().max() > 0:
                errs[gname] = rel(ga, gb)
        w = max(errs.values())
        worst = max(worst, w)
        flag = "[green]ok" if w <= args.tol else "[red]TOO LARGE"
        console.print(f"{name:22s} same indices {same_idx:.4f}; max rel err {w:.2e} {flag}[/]  " +
                      " ".join(f"{k_}={e:.1e}" for k_, e in errs.items()))
    console.print(f"worst relative error {worst:.2e} (tolerance {args.tol:.0e})")
    return 0 if worst <= args.tol else 1


if __name__ == "__main__":
    sys.exit(main())
