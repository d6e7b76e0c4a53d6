"""The full layer's backward on its two engines (cuDNN's fused SDPA backward, the Triton FA2 kernels): correctness
against the reference, then times, in one run (GPU; issue #22 item 3).

    python -m bench.full_bwd_engines [--shapes 32/8/128,64/4/128] [--seqlens 8192,32768] [--check-seqlens 4096]

1. What cuDNN's forward writes as its log-sum-exp (shape, strides, its difference from our forward's `lse`): the
   backward feeds ours to cuDNN's backward in that layout.
2. Correctness (bf16 against the reference in float32, gradients of q, k, v and the full-layer sinks): at
   `--check-seqlens`, batch 2 at an odd length (T = 4096 + 37), the model's layout (q/k/v as `[B, T, H, d]`
   transposed views), with and without sinks, each engine forced.
3. Times at `--seqlens` (batch 1): the backward op alone on each engine, and SDPA cuDNN's own backward (its forward
   run once outside the timing), `do_bench` medians; the whole fwd+bwd of the layer on each engine beside SDPA
   cuDNN's fwd+bwd.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

import hysparse_compile.functional as F
from hysparse_compile.kernels.triton import full_attention_bwd_cudnn as engines
from hysparse_compile.kernels.triton.full_attention import full_attention_bwd, full_attention_fwd

from .baselines import sdpa
from .bench_kernels import rel_err
from .timer import time_ms


def make(B, Hq, Hkv, T, d, model_layout, gen, dev):
    def r(h):
        if model_layout:  # [B, T, H, d] storage, seen as [B, H, T, d]: what the compiled model passes
            return torch.randn(B, T, h, d, generator=gen, device=dev).to(torch.bfloat16).transpose(1, 2)
        return torch.randn(B, h, T, d, generator=gen, device=dev).to(torch.bfloat16)
    return r(Hq), r(Hkv), r(Hkv), r(Hq), torch.randn(Hq, generator=gen, device=dev)


def probe_stats(dev):
    q = torch.randn(1, 8, 300, 128, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, 2, 300, 128, device=dev, dtype=torch.bfloat16)
    ours = full_attention_fwd(q, k, k, 64, 128, 128 ** -0.5, False)[2]
    try:
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k.repeat_interleave(4, 1), k.repeat_interleave(4, 1), None, True, 0.0, True, False, scale=128 ** -0.5)
    except Exception as e:  # noqa: BLE001 - a report, not a path
        return {"error": f"{type(e).__name__}: {e}"[:300]}
    lse = res[1]
    flat = lse.reshape(ours.shape) if lse.numel() == ours.numel() else None
    return {"shape": list(lse.shape), "stride": list(lse.stride()), "dtype": str(lse.dtype),
            "max_abs_diff_vs_ours_natural_log": None if flat is None else (flat - ours).abs().max().item(),
            "philox": [list(res[6].shape), str(res[6].dtype), list(res[7].shape)]}


def check(shape, T, B, model_layout, sinks_on, gen, dev):
    Hq, Hkv, d = map(int, shape.split("/"))
    q, k, v, dout, sinks = make(B, Hq, Hkv, T, d, model_layout, gen, dev)
    sinks = sinks if sinks_on else None
    ref_leaves = [x.float().detach().requires_grad_() for x in (q, k, v)] + (
        [sinks.detach().requires_grad_()] if sinks_on else [])
    out, _ = F.full_attention(*ref_leaves[:3], block_size=64, topk=1024, backend="reference",
                              **({"sinks": ref_leaves[3]} if sinks_on else {}))
    out.backward(dout.float())
    ref = [x.grad for x in ref_leaves]
    rows = []
    for engine in ("cudnn", "triton"):
        leaves = [x.detach().requires_grad_() for x in (q, k, v)] + ([sinks.detach().requires_grad_()] if sinks_on
                                                                      else [])
        with engines.backward_engine(engine):
            out, _ = F.full_attention(*leaves[:3], block_size=64, topk=1024, backend="triton",
                                      **({"sinks": leaves[3]} if sinks_on else {}))
            out.backward(dout)
        errs = {n: rel_err(x.grad, r) for n, x, r in zip(("dq", "dk", "dv", "dsinks"), leaves, ref)}
        ok = all(e < 2e-2 for e in errs.values())
        rows.append(dict(shape=shape, T=T, B=B, model_layout=model_layout, sinks=sinks_on, engine=engine, ok=ok,
                         **errs))
        print(f"{'ok  ' if ok else 'FAIL'} {shape:<9} T={T:<6} B={B} layout={'model' if model_layout else 'bhtd'} "
              f"sinks={sinks_on!s:<5} {engine:<6} " + " ".join(f"{n}={e:.2e}" for n, e in errs.items()), flush=True)
    return rows


def times(shape, T, dev, gen):
    Hq, Hkv, d = map(int, shape.split("/"))
    q, k, v, dout, _ = make(1, Hq, Hkv, T, d, False, gen, dev)
    scale = d ** -0.5
    out, _, lse, _ = full_attention_fwd(q, k, v, 64, 1024, scale, False)
    row = dict(shape=shape, T=T)
    for engine in ("cudnn", "triton"):
        with engines.backward_engine(engine):
            row[f"bwd_{engine}_ms"] = time_ms(lambda: full_attention_bwd(dout, q, k, v, out, lse, scale), dev)
            g = [x.detach().requires_grad_() for x in (q, k, v)]

            def fb():
                o, _ = F.full_attention(*g, block_size=64, topk=1024, backend="triton")
                o.backward(dout)
            row[f"fwdbwd_{engine}_ms"] = time_ms(fb, dev, grad_to_none=g)
    cudnn = sdpa("cudnn")  # SDPA on cuDNN only, causal, GQA: the kernel bench's baseline
    g = [x.detach().requires_grad_() for x in (q, k, v)]
    o = cudnn(*g)
    row["sdpa_cudnn_bwd_ms"] = time_ms(lambda: torch.autograd.grad(o, g, dout, retain_graph=True), dev)
    row["sdpa_cudnn_fwdbwd_ms"] = time_ms(lambda: cudnn(*g).backward(dout), dev, grad_to_none=g)
    print(f"{shape:<9} T={T:<6} bwd: cudnn {row['bwd_cudnn_ms']:.3f} ms, triton {row['bwd_triton_ms']:.3f} ms, "
          f"SDPA cuDNN's own {row['sdpa_cudnn_bwd_ms']:.3f} ms | fwd+bwd: cudnn {row['fwdbwd_cudnn_ms']:.3f}, triton "
          f"{row['fwdbwd_triton_ms']:.3f}, SDPA cuDNN {row['sdpa_cudnn_fwdbwd_ms']:.3f} "
          f"(ratio {row['fwdbwd_cudnn_ms'] / row['sdpa_cudnn_fwdbwd_ms']:.2f}x / "
          f"{row['fwdbwd_triton_ms'] / row['sdpa_cudnn_fwdbwd_ms']:.2f}x)", flush=True)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="32/8/128,64/4/128")
    ap.add_argument("--seqlens", default="8192,32768")
    ap.add_argument("--check-seqlens", default="4096")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("full_bwd_engines: needs a CUDA device")
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "cudnn": torch.backends.cudnn.version(), "stats_probe": probe_stats(dev), "checks": [], "times": []}
    print("cuDNN forward's stats:", result["stats_probe"], flush=True)
    shapes = a.shapes.split(",")
    for T in (int(t) for t in a.check_seqlens.split(",") if t):
        for shape in shapes:
            result["checks"] += check(shape, T, 1, False, False, gen, dev)
            result["checks"] += check(shape, T, 1, True, True, gen, dev)
        result["checks"] += check(shapes[0], T + 37, 2, True, False, gen, dev)
    for T in (int(t) for t in a.seqlens.split(",") if t):
        for shape in shapes:
            result["times"].append(times(shape, T, dev, gen))
    bad = [c for c in result["checks"] if not c["ok"]]
    print(f"checks: {len(result['checks']) - len(bad)} / {len(result['checks'])} ok", flush=True)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "full_bwd_engines.json"), "w") as f:
        json.dump(result, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
