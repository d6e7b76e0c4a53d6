"""The full layer's forward (flash pass + running top-k + head merge) in its variants, checked then timed against
SDPA cuDNN in one run (GPU; issue #22 item 3, the forward).

    python -m bench.full_fwd_variants [--shapes 32/8/128,64/4/128] [--seqlens 8192,32768] [--check-seqlen 4096]
                                      [--variants NAME,...] [--set-default]

Variants (`VARIANTS`): the pointer kernel as tuned (`ptr`, the default), the same with the P @ V product accumulating
into the rescaled accumulator (`acc`), and K/V through tensor descriptors (Hopper bulk copies, `tma`) at several
tiles. A descriptor variant that fails to build falls back to pointer loads inside `launch_forward`; the bench
reports that as `fell_back` and does not time it as TMA.

1. Checks at `--check-seqlen` (bf16 against the float32 reference): out relative L2, lse max abs, the share of rows
   whose selection equals the reference's and the default variant's; plus, per variant, the model's transposed
   layout with sinks at batch 2 and an odd length (T + 37) against the default variant.
2. Times (`do_bench` medians, batch 1) at `--seqlens`: each variant with selection (top-k 1024, block 64) and
   without (the flash pass alone, first shape), beside SDPA cuDNN (causal, GQA) on the same inputs, laid out as
   `--layout` says: `model` (default; q/k/v as `[B, T, H, d]` seen as `[B, H, T, d]`, what both the compiled and the
   original HF models pass) or `bhtd` (contiguous, as the kernel tables before 2026-12-05 were timed).
`--set-default` ends by printing the fastest checked variant's config (what FWD_CONFIG should become).
`--dry-run`: tiny shapes on the CPU under TRITON_INTERPRET=1 (checks the script, times nothing worth reading).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from hysparse_compile.kernels import reference
from hysparse_compile.kernels.triton import full_attention as fa

from .bench_kernels import rel_err
from .timer import time_ms

BS, TOPK = 64, 1024
VARIANTS = {
    "ptr_64x64_w4_s3": dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    "acc_64x64_w4_s3": dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3, acc_dot=True),
    "tma_64x64_w4_s3": dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3, tma=True),
    "tma_acc_64x64_w4_s3": dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3, tma=True, acc_dot=True),
    "tma_acc_64x64_w4_s4": dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=4, tma=True, acc_dot=True),
    "tma_acc_128x64_w8_s3": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, tma=True, acc_dot=True),
    "tma_acc_128x128_w8_s2": dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2, tma=True, acc_dot=True),
    # 2-D descriptors (the model's [B, T, Hkv, d] layout seen as [B * T, Hkv * d]; contiguous K/V as [B*Hkv*T, d])
    "tma2d_acc_64x64_w4_s3": dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3, tma="2d", acc_dot=True),
    "tma2d_acc_128x64_w8_s3": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, tma="2d", acc_dot=True),
    # warp-specialized off-diagonal loop (Triton's automatic warp specialization; needs the descriptor loads)
    "tma2d_acc_ws_128x64_w8_s3": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, tma="2d", acc_dot=True,
                                      ws=True),
    "tma2d_acc_ws_128x128_w8_s2": dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2, tma="2d", acc_dot=True,
                                       ws=True),
    # around the winner of 2026-12-06 (the default): its pipeline depth, 4-D descriptors, the plain P @ V
    "tma2d_acc_ws_128x64_w8_s2": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2, tma="2d", acc_dot=True,
                                      ws=True),
    "tma2d_acc_ws_128x64_w8_s4": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=4, tma="2d", acc_dot=True,
                                      ws=True),
    "tma_acc_ws_128x64_w8_s3": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, tma=True, acc_dot=True,
                                    ws=True),
    "tma2d_ws_128x64_w8_s3": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, tma="2d", ws=True),
}
# every variant names every option, so that FWD_CONFIG.update(VARIANTS[name]) runs exactly that variant
VARIANTS = {name: {"tma": False, "acc_dot": False, "ws": False, **cfg} for name, cfg in VARIANTS.items()}
DEFAULT = "tma2d_acc_ws_128x64_w8_s3"  # FWD_CONFIG since 2026-12-05 (m): the fastest of these on the H100


def forward(q, k, v, cfg, topk=TOPK, sinks=None, block=BS):
    """The layer's forward as `full_attention_fwd` runs it, with explicit tiles: flash pass, then the head merge."""
    out, lse, cand_s, cand_i = fa.launch_forward(q, k, v, sinks, block, topk, q.shape[-1] ** -0.5, cfg=dict(cfg))
    return out, fa.merged_indices(cand_s, cand_i, k.shape[1], block, topk), lse


def inputs(B, Hq, Hkv, T, d, gen, dev, dtype, model_layout=False):
    def r(h):
        if model_layout:  # [B, T, H, d] storage seen as [B, H, T, d]: what the compiled model passes
            return torch.randn(B, T, h, d, generator=gen, device=dev).to(dtype).transpose(1, 2)
        return torch.randn(B, h, T, d, generator=gen, device=dev).to(dtype)
    return r(Hq), r(Hkv), r(Hkv)


def _warm(job):
    """Compile one variant's kernels in a worker process (the on-disk Triton cache is shared: the main process then
    finds them built). job = (cfg, Hq, Hkv, d): the specializations the run uses (contiguous and model layout, with
    and without selection, with sinks) at a short length."""
    cfg, Hq, Hkv, d = job
    gen = torch.Generator(device="cuda").manual_seed(0)
    for model_layout in (False, True):
        q, k, v = inputs(1, Hq, Hkv, 1024, d, gen, torch.device("cuda"), torch.bfloat16, model_layout)
        forward(q, k, v, cfg)
        forward(q, k, v, cfg, topk=0)
        forward(q, k, v, cfg, sinks=torch.zeros(Hq, device="cuda"))
    torch.cuda.synchronize()
    return fa.TMA_FAILED.copy()


def precompile(variants, shapes, timeout_s=150):
    """Build every variant's kernels in parallel worker processes before the checks (compiling ~30 kernels one
    after another would take most of a device call)."""
    import multiprocessing as mp
    jobs = [(cfg, *map(int, shapes[0].split("/"))) for cfg in variants.values()]
    pool = mp.get_context("spawn").Pool(min(14, len(jobs)))
    try:
        pool.map_async(_warm, jobs).get(timeout=timeout_s)
    except Exception as e:  # noqa: BLE001 - the checks compile whatever is missing
        print(f"precompile: {e!r}"[:300], flush=True)
    finally:
        pool.terminate()


def check(shape, T, variants, gen, dev, dtype, block, topk):
    Hq, Hkv, d = map(int, shape.split("/"))
    q, k, v = inputs(1, Hq, Hkv, T, d, gen, dev, dtype)
    r_out, r_idx, r_lse, _ = reference.full_attention_fwd(q.float(), k.float(), v.float(), block, topk, d ** -0.5,
                                                          False)
    base = forward(q, k, v, variants[DEFAULT], topk, block=block)
    qm, km, vm = inputs(2, Hq, Hkv, T + 37, d, gen, dev, dtype, model_layout=True)
    sinks = torch.randn(Hq, generator=gen, device=dev)
    base_m = forward(qm, km, vm, variants[DEFAULT], topk, sinks, block)
    rows = []
    for name, cfg in variants.items():
        fa.TMA_FAILED.clear()
        out, idx, lse = forward(q, k, v, cfg, topk, block=block)
        out_m, idx_m, _ = forward(qm, km, vm, cfg, topk, sinks, block)
        row = dict(shape=shape, T=T, variant=name, out_rel=rel_err(out, r_out),
                   lse_max_abs=(lse - r_lse).abs().max().item(),
                   idx_rows_as_reference=(idx == r_idx).all(-1).float().mean().item(),
                   idx_rows_as_default=(idx == base[1]).all(-1).float().mean().item(),
                   model_layout_sinks_rel_vs_default=rel_err(out_m, base_m[0]),
                   model_layout_idx_rows_as_default=(idx_m == base_m[1]).all(-1).float().mean().item(),
                   fell_back=dict((str(key), why) for key, why in fa.TMA_FAILED.items()) or None)
        row["ok"] = (row["out_rel"] < 1e-2 and row["lse_max_abs"] < 1e-3 and row["idx_rows_as_default"] > 0.99
                     and row["model_layout_sinks_rel_vs_default"] < 1e-2 and not row["fell_back"])
        rows.append(row)
        print(f"{'ok  ' if row['ok'] else 'FAIL'} {shape:<9} T={T} {name:<22} out {row['out_rel']:.2e} lse "
              f"{row['lse_max_abs']:.1e} idx=ref {row['idx_rows_as_reference']:.4f} idx=default "
              f"{row['idx_rows_as_default']:.4f} model/sinks {row['model_layout_sinks_rel_vs_default']:.1e}"
              + (f" FELL BACK {row['fell_back']}" if row["fell_back"] else ""), flush=True)
    return rows


def times(shape, T, variants, gen, dev, dtype, nosel, cudnn, layout, block=BS, topk=TOPK):
    Hq, Hkv, d = map(int, shape.split("/"))
    q, k, v = inputs(1, Hq, Hkv, T, d, gen, dev, dtype, model_layout=layout == "model")
    row = dict(shape=shape, T=T, layout=layout)
    if cudnn is not None:
        row["sdpa_cudnn_ms"] = time_ms(lambda: cudnn(q, k, v), dev)
    for name, cfg in variants.items():
        fa.TMA_FAILED.clear()
        row[f"{name}_sel_ms"] = time_ms(lambda: forward(q, k, v, cfg, topk, block=block), dev)
        if nosel:
            row[f"{name}_nosel_ms"] = time_ms(lambda: forward(q, k, v, cfg, topk=0, block=block), dev)
        if fa.TMA_FAILED:
            row[f"{name}_fell_back"] = True
        base = row.get("sdpa_cudnn_ms")
        print(f"{shape:<9} T={T:<6} {name:<22} sel {row[f'{name}_sel_ms']:8.3f} ms"
              + (f" ({row[f'{name}_sel_ms'] / base:.3f}x cuDNN)" if base else "")
              + (f" | flash pass alone {row[f'{name}_nosel_ms']:8.3f} ms" if nosel else "")
              + (f" ({row[f'{name}_nosel_ms'] / base:.3f}x)" if nosel and base else "")
              + (" FELL BACK to pointer loads" if fa.TMA_FAILED else ""), flush=True)
    if "sdpa_cudnn_ms" in row:
        print(f"{shape:<9} T={T:<6} {'SDPA cuDNN':<22} {row['sdpa_cudnn_ms']:8.3f} ms", flush=True)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="32/8/128,64/4/128")
    ap.add_argument("--seqlens", default="8192,32768")
    ap.add_argument("--check-seqlen", type=int, default=4096)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--layout", default="model", choices=("model", "bhtd"))
    ap.add_argument("--set-default", action="store_true")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    a = ap.parse_args(argv)
    names = [n for n in a.variants.split(",") if n]
    bad = [n for n in names if n not in VARIANTS]
    if bad:
        sys.exit(f"full_fwd_variants: unknown --variants {bad}; valid: {', '.join(VARIANTS)}")
    if DEFAULT not in names:
        names.insert(0, DEFAULT)
    variants = {n: dict(VARIANTS[n]) for n in names}
    if a.dry_run:  # CPU interpreter, tiny shapes; tiles shrunk to the interpreter's smallest legal ones
        dev, dtype, block, topk = torch.device("cpu"), torch.float32, 16, 32
        for cfg in variants.values():
            cfg.update(BLOCK_M=min(cfg["BLOCK_M"], 32), BLOCK_N=min(cfg["BLOCK_N"], 16), num_stages=1)
        shapes, seqlens, check_T, cudnn = ["4/2/16"], [40], 37, None
    else:
        if not torch.cuda.is_available():
            sys.exit("full_fwd_variants: needs a CUDA device (or --dry-run under TRITON_INTERPRET=1)")
        from .baselines import sdpa
        dev, dtype, block, topk = torch.device("cuda"), torch.bfloat16, BS, TOPK
        shapes, seqlens, check_T = a.shapes.split(","), [int(t) for t in a.seqlens.split(",") if t], a.check_seqlen
        cudnn = sdpa("cudnn")
        precompile(variants, shapes)
    gen = torch.Generator(device=dev).manual_seed(0)
    result = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (dry run)",
              "torch": torch.__version__, "variants": variants, "checks": [], "times": []}
    for shape in shapes:
        result["checks"] += check(shape, check_T, variants, gen, dev, dtype, block, topk)
    passed = [n for n in names if all(c["ok"] for c in result["checks"] if c["variant"] == n)]
    print(f"checks: {sum(c['ok'] for c in result['checks'])} / {len(result['checks'])} ok; timing {passed}",
          flush=True)
    for T in seqlens:  # the dry run too: its rows check the timing path, not the kernels' speed
        for i, shape in enumerate(shapes):
            result["times"].append(times(shape, T, {n: variants[n] for n in passed}, gen, dev, dtype,
                                         nosel=i == 0, cudnn=cudnn, layout=a.layout, block=block, topk=topk))
    if a.set_default and any("sdpa_cudnn_ms" in r for r in result["times"]):
        total = {n: sum(r[f"{n}_sel_ms"] / r["sdpa_cudnn_ms"] for r in result["times"] if f"{n}_sel_ms" in r)
                 for n in passed}
        best = min(total, key=total.get)
        result["fastest"] = {"variant": best, "config": variants[best], "mean_ratio_vs_cudnn":
                             total[best] / len(result["times"])}
        print(f"fastest checked variant (mean ratio to cuDNN over {len(result['times'])} rows): {best} "
              f"{result['fastest']['mean_ratio_vs_cudnn']:.3f}x -> FWD_CONFIG {variants[best]}", flush=True)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "full_fwd_variants.json"), "w") as f:
        json.dump(result, f, indent=1)
    return 0 if len(passed) == len(names) else 1


if __name__ == "__main__":
    sys.exit(main())
