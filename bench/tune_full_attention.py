"""Check and time the Triton full-attention kernels (forward + selection, backward, decode) on a GPU.

Correctness at real sizes against the reference backend run on fp32-upcast inputs (chunked, no T x T tensor), then
timings (triton.testing.do_bench, median) against SDPA cuDNN dense and SDPA flash, then a small tuning sweep.
Usage: python -m bench.tune_full_attention [--quick]   (writes $OUT/full_attention.json if OUT is set)
"""

import json
import math
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from hysparse_compile.kernels import reference
from hysparse_compile.kernels.triton import full_attention as fa
from hysparse_compile.kernels.triton.full_attention_decode import full_attention_decode
from hysparse_compile.kernels.triton.select_blocks import launch_merge_heads

from .timer import time_ms

DEV = "cuda"
BS, TOPK = 64, 1024
RESULTS = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M"), "check": [], "time": [], "tune": [], "errors": []}
ROWS = []


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def inputs(B, Hq, Hkv, T, d, seed, dtype=torch.bfloat16):
    g = torch.Generator(device=DEV).manual_seed(seed)
    q = torch.randn(B, Hq, T, d, device=DEV, dtype=dtype, generator=g)
    k = torch.randn(B, Hkv, T, d, device=DEV, dtype=dtype, generator=g)
    v = torch.randn(B, Hkv, T, d, device=DEV, dtype=dtype, generator=g)
    return q, k, v


def selection_deficit(idx, ref_idx, scores, Hkv):
    """Max over rows of |sorted group scores of our pick - of the reference's pick| / row max (0 when identical)."""
    B, Hq, T, nb = scores.shape
    sg = scores.view(B, Hkv, Hq // Hkv, T, nb).amax(2)  # [B, Hkv, T, nb]

    def picked(ix):
        s = torch.gather(sg, -1, ix.long().clamp_min(0))
        return torch.where(ix >= 0, s, torch.zeros_like(s)).sort(-1, descending=True).values

    d = (picked(idx) - picked(ref_idx)).abs().amax(-1) / sg.amax(-1).clamp_min(1e-30)
    return d.max().item(), (idx == ref_idx).all(-1).float().mean().item()


def check(Hq, Hkv, T, d=128, bwd=True):
    q, k, v = inputs(1, Hq, Hkv, T, d, seed=T + Hq)
    scale = 1 / math.sqrt(d)
    out, idx, lse, _ = fa.full_attention_fwd(q, k, v, BS, TOPK, scale, False)
    r_out, r_idx, r_lse, r_sc = reference.full_attention_fwd(q.float(), k.float(), v.float(), BS, TOPK, scale, True)
    deficit, exact = selection_deficit(idx, r_idx, r_sc, Hkv)
    del r_sc
    row = {"shape": f"{Hq}/{Hkv}/{d}", "T": T, "out_rel": rel(out, r_out), "lse_max_abs": (lse - r_lse).abs().max().item(),
           "idx_rows_exact": exact, "sel_score_deficit": deficit}
    if bwd:
        do = torch.randn_like(q)
        dq, dk, dv = fa.full_attention_bwd(do, q, k, v, out, lse, scale)
        rq, rk, rv = reference.full_attention_bwd(do.float(), q.float(), k.float(), v.float(), r_out, r_lse, scale)
        row.update(dq_rel=rel(dq, rq), dk_rel=rel(dk, rk), dv_rel=rel(dv, rv))
    RESULTS["check"].append(row)
    print("check", row, flush=True)


def check_decode(B, Hq, Hkv, S, d=128):
    q, kc, vc = inputs(B, Hq, Hkv, S, d, seed=S)
    q = q[:, :, :1].contiguous()
    lens = torch.randint(S // 2, S + 1, (B,), device=DEV, dtype=torch.int32)
    out, idx = full_attention_decode(q, kc, vc, lens, BS, TOPK, 1 / math.sqrt(d))
    r_out, r_idx = reference.full_attention_decode(q.float(), kc.float(), vc.float(), lens, BS, TOPK, 1 / math.sqrt(d))
    row = {"decode": f"B{B} {Hq}/{Hkv}/{d}", "S": S, "out_rel": rel(out, r_out),
           "idx_rows_exact": (idx == r_idx).all(-1).float().mean().item()}
    RESULTS["check"].append(row)
    print("check", row, flush=True)


def bench(fn):
    return time_ms(fn, "cuda")


def sdpa_fns(q, k, v, backend):
    G = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)

    def fwd():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, kr, vr, is_causal=True)
    return fwd, kr, vr


def time_shape(Hq, Hkv, T, d=128, do_bwd=True):
    q, k, v = inputs(1, Hq, Hkv, T, d, seed=1)
    scale = 1 / math.sqrt(d)
    row = {"shape": f"{Hq}/{Hkv}/{d}", "T": T}
    row["ours_fwd_sel"] = bench(lambda: fa.full_attention_fwd(q, k, v, BS, TOPK, scale, False))
    row["ours_fwd_nosel"] = bench(lambda: fa.full_attention_fwd(q, k, v, BS, 0, scale, False))
    _, _, cand_s, cand_i = fa.launch_forward(q, k, v, None, BS, TOPK, scale)  # where the selection cost goes
    row["ours_flash_pass_sel"] = bench(lambda: fa.launch_forward(q, k, v, None, BS, TOPK, scale))
    row["ours_merge"] = bench(lambda: launch_merge_heads(cand_s, cand_i, Hkv, TOPK // BS, length=q.shape[2]))
    for name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        try:
            fwd, kr, vr = sdpa_fns(q, k, v, be)
            row[f"{name}_fwd"] = bench(fwd)
            if do_bwd:
                qg, kg, vg = (x.detach().requires_grad_() for x in (q, kr, vr))
                with sdpa_kernel(be):
                    o = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True)
                do = torch.randn_like(o)
                row[f"{name}_bwd"] = bench(lambda: torch.autograd.grad(o, (qg, kg, vg), do, retain_graph=True))
        except Exception as e:  # noqa: BLE001
            RESULTS["errors"].append(f"{name} {T}: {e!r}"[:300])
    if do_bwd:
        out, _, lse, _ = fa.full_attention_fwd(q, k, v, BS, TOPK, scale, False)
        do = torch.randn_like(out)
        row["ours_bwd"] = bench(lambda: fa.full_attention_bwd(do, q, k, v, out, lse, scale))
    if "cudnn_fwd" in row:
        row["ratio_fwd_sel_vs_cudnn"] = row["ours_fwd_sel"] / row["cudnn_fwd"]
    RESULTS["time"].append(row)
    print("time", row, flush=True)


def time_decode(B, Hq, Hkv, S, d=128):
    q, kc, vc = inputs(B, Hq, Hkv, S, d, seed=2)
    q = q[:, :, :1].contiguous()
    lens = torch.full((B,), S, device=DEV, dtype=torch.int32)
    row = {"decode": f"B{B} {Hq}/{Hkv}/{d}", "S": S}
    row["ours"] = bench(lambda: full_attention_decode(q, kc, vc, lens, BS, TOPK, 1 / math.sqrt(d)))
    kr, vr = kc.repeat_interleave(Hq // Hkv, 1), vc.repeat_interleave(Hq // Hkv, 1)
    row["sdpa_repeat"] = bench(lambda: F.scaled_dot_product_attention(q, kr, vr))
    row["min_bytes_ms"] = 2 * kc.numel() * kc.element_size() / 3.0e9  # at ~3 TB/s
    RESULTS["time"].append(row)
    print("time", row, flush=True)


FWD_SWEEP = ((128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 64, 8, 2))
BWD_SWEEP = ((64, 128, 8, 3), (32, 128, 4, 3), (64, 64, 4, 3), (64, 128, 8, 2))


def _warm(job):
    """Compile one kernel variant in a worker process (fills the shared Triton cache; the main process then hits it)."""
    kind, cfg, Hq, Hkv = job
    q, k, v = inputs(1, Hq, Hkv, 1024, 128, seed=0)
    keys = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
    if kind == "fwd":
        fa.FWD_CONFIG.update(zip(keys, cfg))
        fa.full_attention_fwd(q, k, v, BS, TOPK, 0.1, False)
        fa.full_attention_fwd(q, k, v, BS, 0, 0.1, False)
    elif kind == "bwd":
        fa.BWD_CONFIG.update(zip(keys, cfg))
        out, _, lse, _ = fa.full_attention_fwd(q, k, v, BS, TOPK, 0.1, False)
        fa.full_attention_bwd(torch.randn_like(out), q, k, v, out, lse, 0.1)
    else:
        S = cfg
        kc, vc = (x.expand(8, Hkv, 1024, 128).contiguous() for x in (k, v))
        kc, vc = (torch.cat([x] * (S // 1024), 2) for x in (kc, vc))
        full_attention_decode(q[:, :, :1].expand(8, -1, -1, -1).contiguous(), kc, vc,
                              torch.full((8,), S, device=DEV, dtype=torch.int32), BS, TOPK, 0.1)
    torch.cuda.synchronize()
    return job


def precompile_async():
    import multiprocessing as mp
    jobs = [("fwd", c, 32, 8) for c in FWD_SWEEP] + [("fwd", FWD_SWEEP[0], 64, 4)]
    jobs += [("bwd", c, 32, 8) for c in BWD_SWEEP] + [("dec", S, 32, 8) for S in (32768, 131072)]
    pool = mp.get_context("spawn").Pool(min(14, len(jobs)))
    return pool, pool.map_async(_warm, jobs)


def tune(Hq, Hkv, T, d=128):
    """Sweep forward/backward tile configs at one shape; keep the fastest in fa.FWD_CONFIG / fa.BWD_CONFIG."""
    q, k, v = inputs(1, Hq, Hkv, T, d, seed=3)
    scale = 1 / math.sqrt(d)
    keys = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
    best = (float("inf"), dict(fa.FWD_CONFIG))
    for cfg in FWD_SWEEP:
        fa.FWD_CONFIG.update(zip(keys, cfg))
        try:
            ms = bench(lambda: fa.full_attention_fwd(q, k, v, BS, TOPK, scale, False))
            ms0 = bench(lambda: fa.full_attention_fwd(q, k, v, BS, 0, scale, False))
            RESULTS["tune"].append({"T": T, "cfg": list(cfg), "fwd_sel": ms, "fwd_nosel": ms0})
            print("tune fwd", T, cfg, round(ms, 3), round(ms0, 3), flush=True)
            best = min(best, (ms, dict(fa.FWD_CONFIG)), key=lambda x: x[0])
        except Exception as e:  # noqa: BLE001
            RESULTS["errors"].append(f"tune fwd {cfg}: {e!r}"[:300])
    fa.FWD_CONFIG.update(best[1])
    RESULTS["best_fwd"] = best[1]
    out, _, lse, _ = fa.full_attention_fwd(q, k, v, BS, TOPK, scale, False)
    do = torch.randn_like(out)
    best = (float("inf"), dict(fa.BWD_CONFIG))
    for cfg in BWD_SWEEP:
        fa.BWD_CONFIG.update(zip(keys, cfg))
        try:
            ms = bench(lambda: fa.full_attention_bwd(do, q, k, v, out, lse, scale))
            RESULTS["tune"].append({"T": T, "bwd_cfg": list(cfg), "bwd": ms})
            print("tune bwd", T, cfg, round(ms, 3), flush=True)
            best = min(best, (ms, dict(fa.BWD_CONFIG)), key=lambda x: x[0])
        except Exception as e:  # noqa: BLE001
            RESULTS["errors"].append(f"tune bwd {cfg}: {e!r}"[:300])
    fa.BWD_CONFIG.update(best[1])
    RESULTS["best_bwd"] = best[1]
    print("best", RESULTS["best_fwd"], RESULTS["best_bwd"], flush=True)


def step(fn, *args, **kw):
    t0 = time.time()
    try:
        fn(*args, **kw)
    except Exception:  # noqa: BLE001
        RESULTS["errors"].append(f"{fn.__name__}{args}: {traceback.format_exc()[-1500:]}")
        print(RESULTS["errors"][-1], flush=True)
    print(f"  [{fn.__name__}{args} {time.time() - t0:.1f}s]", flush=True)
    save()


def save():
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "full_attention.json"), "w") as f:
            json.dump(RESULTS, f, indent=1)


def main():
    quick = "--quick" in sys.argv
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    pool, pending = precompile_async()
    step(check, 32, 8, 4096)
    step(check, 64, 4, 4096, bwd=False)
    step(check, 32, 8, 8192, bwd=not quick)
    step(check_decode, 4, 32, 8, 32768)
    if not quick:
        step(check, 32, 8, 32768, bwd=False)
    t0 = time.time()
    try:
        pending.get(timeout=150)
    except Exception as e:  # noqa: BLE001
        RESULTS["errors"].append(f"precompile: {e!r}"[:300])
    pool.terminate()
    print(f"  [precompile wait {time.time() - t0:.1f}s]", flush=True)
    if not quick:
        step(tune, 32, 8, 8192)
    for T in (8192, 32768):
        step(time_shape, 32, 8, T)
        step(time_shape, 64, 4, T, do_bwd=False)
    step(time_decode, 8, 32, 8, 32768)
    step(time_decode, 8, 32, 8, 131072)
    print("\n== checks ==")
    for r in RESULTS["check"]:
        print({k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()})
    print("== times (ms, median) ==")
    for r in RESULTS["time"]:
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()})
    print("== errors ==", len(RESULTS["errors"]))
    for e in RESULTS["errors"]:
        print(e[-400:])


if __name__ == "__main__":
    main()
