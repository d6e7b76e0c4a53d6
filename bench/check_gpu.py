"""Correctness of the Triton and Flex backends against the reference in float32, at real sizes, on the GPU.

    python -m bench.check_gpu [--seqlens 4096,8192,32768] [--bwd-seqlens 4096,8192] [--smoke]
        [--orders token,block] [--full-fwd VARIANT] [--combine fused] [--token-tma off|4d|2d] [--layout hf]

For bf16 inputs, both paper shapes (Hq/Hkv/d = 32/8/128 and 64/4/128), block 64, topk 1024, window 128:
full layer (out, lse, indices), sparse layer with per-channel gates and sinks on the full layer's own selection,
the training-free merge, gradients of both ops, and both decode ops. Each check prints max |err|, mean |err| and
the relative L2 error against the reference run on the same inputs upcast to float32 (TF32 off), and the fraction
of (token, group) rows whose selection equals the fp32 one (bf16 near-ties make it slightly < 1). The Triton sparse
layer is checked with its default loop order ("auto") and again with each order of --orders forced
(`sparse.out[block]`, `grad.*[block]`, ...: token-major / K/V-block-major, docs/kernels_sparse.md).
`--full-fwd`, `--combine`, `--token-tma` run the kernel variants that are off by default (their names join every
check's tag); a descriptor kernel that falls back to pointer loads counts as a failure. `--layout hf` lays the
inputs out as the model does (`inputs`), so the kernels read and write through the strides a model gives them.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import torch

from hysparse_compile import functional as F

from . import kernel_options as variant_flags

ORDERS: list[str] = []  # Triton sparse-layer loop orders checked on top of the default (--orders)
PARAMS: dict = {}  # --softcap / --full-sinks: the op parameters every check passes (Gemma 2, gpt-oss)


def full_kw(X) -> dict:
    """softcap for the full-layer ops, and their own sinks with --full-sinks."""
    return dict(softcap=PARAMS.get("softcap"), sinks=X["sinks_full"] if PARAMS.get("full_sinks") else None)


def sparse_kw() -> dict:
    return dict(softcap=PARAMS.get("softcap"))


def tag(name: str) -> str:
    """The check's name with the parameters it ran with (`full.out[cap,sinks]`)."""
    parts = (["cap"] if PARAMS.get("softcap") else []) + (["sinks"] if PARAMS.get("full_sinks") else [])
    parts += PARAMS.get("variant") or []
    return f"{name}[{','.join(parts)}]" if parts else name


def kernel_options(args):
    """--full-fwd / --combine / --token-tma: set the Triton kernels' module defaults, so that every op call (the
    backward's recomputation included) runs them; recorded in PARAMS and in every check's name."""
    if not (args.full_fwd or args.combine or args.token_tma):
        return
    try:
        variant_flags.apply(args.full_fwd, args.combine, args.token_tma)
    except ValueError as e:
        sys.exit(f"check_gpu: {e}")
    PARAMS.update(variant=[x for x in (args.full_fwd, args.combine and f"combine={args.combine}",
                                       args.token_tma and f"token-tma={args.token_tma}") if x])


def descriptor_fallbacks() -> dict:
    """Where a tensor-descriptor kernel failed to build and the pointer kernel ran instead (kernel -> reasons)."""
    if not PARAMS.get("variant"):
        return {}
    from hysparse_compile.kernels.triton import full_attention as fa
    from hysparse_compile.kernels.triton import sparse_attention as tsa
    return {name: {str(k): v for k, v in failed.items()}
            for name, failed in (("full", fa.TMA_FAILED), ("sparse", tsa.TMA_FAILED)) if failed}


def forced_orders(backend):
    """(suffix, context manager) per loop order to check for this backend: the default first."""
    yield "", contextlib.nullcontext()
    if backend == "triton":
        from hysparse_compile.kernels.triton.sparse_attention import forward_order

        for order in ORDERS:
            yield f"[{order}]", forward_order(order)

ROWS: list[dict] = []


def errors(x, ref) -> dict:
    d = (x.float() - ref.float()).abs()
    return {"max_abs": d.max().item(), "mean_abs": d.mean().item(),
            "rel_l2": ((x.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()}


def record(name, shape, T, backend, errs, extra=None, tol=2e-2):
    name = tag(name)
    row = {"check": name, "shape": shape, "T": T, "backend": backend, **errs, **(extra or {})}
    row["ok"] = errs["rel_l2"] < tol and all(torch.isfinite(torch.tensor(v)) for v in errs.values())
    ROWS.append(row)
    more = " ".join(f"{k}={v:.6f}" if isinstance(v, float) else f"{k}={v}" for k, v in (extra or {}).items())
    print(f"{'ok  ' if row['ok'] else 'FAIL'} {name:<22} {shape:<9} T={T:<6} {backend:<7} max={errs['max_abs']:.3e} "
          f"mean={errs['mean_abs']:.3e} rel_l2={errs['rel_l2']:.3e} {more}", flush=True)


def inputs(B, Hq, Hkv, T, d, dtype, device, gen, layout="contiguous"):
    """One case's tensors, [B, H, T, d] contiguous, or with layout "hf" as an HF attention module and the
    compiled model make them: q/k/v transposed views of [B, T, H, d] projections, the two gates views of one
    [B, T, 2, Hq, d] projection, dout a transposed view (o_proj's gradient)."""
    r = lambda *s: torch.randn(*s, generator=gen, device=device).to(dtype)  # noqa: E731
    if layout == "hf":
        t = lambda H: r(B, T, H, d).transpose(1, 2)  # noqa: E731
        gs, gw = torch.sigmoid(r(B, T, 2, Hq, d)).permute(2, 0, 3, 1, 4)
    else:
        t = lambda H: r(B, H, T, d)  # noqa: E731
        gs, gw = torch.sigmoid(r(B, Hq, T, d)), torch.sigmoid(r(B, Hq, T, d))
    return dict(q=t(Hq), k=t(Hkv), v=t(Hkv), k_own=t(Hkv), v_own=t(Hkv), gs=gs, gw=gw,
                sinks=torch.randn(Hq, generator=gen, device=device), dout=t(Hq),
                sinks_full=torch.randn(Hq, generator=gen, device=device))


def check_forward(x, shape, T, backends, bs, topk, w):
    f32 = {k: v.float() for k, v in x.items()}
    out_ref, idx_ref = F.full_attention(f32["q"], f32["k"], f32["v"], block_size=bs, topk=topk, backend="reference",
                                        **full_kw(f32))
    sp = lambda X, idx, b, merge=False: F.sparse_attention(  # noqa: E731
        X["q"], X["k"] if merge else X["k_own"], X["v"] if merge else X["v_own"], X["k"], X["v"], idx,
        block_size=bs, window=w, gate_sparse=None if merge else X["gs"], gate_swa=None if merge else X["gw"],
        sinks=X["sinks"], merge=merge, backend=b, **sparse_kw())
    sparse_ref = sp(f32, idx_ref, "reference")
    merge_ref = sp(f32, idx_ref, "reference", merge=True)
    for b in backends:
        out, idx = F.full_attention(x["q"], x["k"], x["v"], block_size=bs, topk=topk, backend=b, **full_kw(x))
        same = (idx == idx_ref).all(-1).float().mean().item()
        record("full.out", shape, T, b, errors(out, out_ref), {"indices_rows_equal": same})
        for sfx, ctx in forced_orders(b):
            with ctx:
                record(f"sparse.out{sfx}", shape, T, b, errors(sp(x, idx_ref, b), sparse_ref))
        record("sparse.merge.out", shape, T, b, errors(sp(x, idx_ref, b, merge=True), merge_ref))
        del out, idx
    return idx_ref


def check_backward(x, shape, T, backends, bs, topk, w):
    GRADS = ("q", "k", "v", "k_own", "v_own", "gs", "gw", "sinks") + (("sinks_full",) if PARAMS.get("full_sinks")
                                                                      else ())

    def run(X, b, save_branches=False):
        leaves = {k: X[k].detach().requires_grad_() for k in GRADS}
        out, idx = F.full_attention(leaves["q"], leaves["k"], leaves["v"], block_size=bs, topk=topk, backend=b,
                                    **full_kw(leaves))
        y = F.sparse_attention(leaves["q"], leaves["k_own"], leaves["v_own"], leaves["k"], leaves["v"], idx_fixed,
                               block_size=bs, window=w, gate_sparse=leaves["gs"], gate_swa=leaves["gw"],
                               sinks=leaves["sinks"], save_branches=save_branches, backend=b, **sparse_kw())
        torch.autograd.backward([out, y], [X["dout"], X["dout"]])
        return {k: v.grad for k, v in leaves.items()}

    f32 = {k: v.float() for k, v in x.items()}
    _, idx_fixed = F.full_attention(f32["q"], f32["k"], f32["v"], block_size=bs, topk=topk, backend="reference",
                                    **full_kw(f32))
    ref = run(f32, "reference")
    for b in backends:
        # default: the backward recomputes the branch outputs; "[saved]": save_branches=True keeps them
        for sfx, ctx, save in [*((sfx, ctx, False) for sfx, ctx in forced_orders(b)),
                               ("[saved]", contextlib.nullcontext(), True)]:
            with ctx:
                got = run(x, b, save)
            for name in GRADS:
                record(f"grad.{name}{sfx}", shape, T, b, errors(got[name], ref[name]))
            del got


def check_decode(x, shape, S, backends, bs, topk, w):
    B = x["q"].shape[0]
    cache_len = torch.tensor([S - 5, S][:B], dtype=torch.int32, device=x["q"].device)
    q1 = x["q"][:, :, -1:].contiguous()
    W = w
    pos = (cache_len.long() - 1).view(B, 1) - torch.arange(W, device=q1.device).view(1, W)  # last W positions
    slot = pos.remainder(W)
    k_win = torch.empty_like(x["k_own"][:, :, :W])
    v_win = torch.empty_like(k_win)
    for b in range(B):
        k_win[b][:, slot[b]] = x["k_own"][b][:, pos[b].clamp_min(0)]
        v_win[b][:, slot[b]] = x["v_own"][b][:, pos[b].clamp_min(0)]
    f = lambda t: t.float()  # noqa: E731
    o_ref, i_ref = F.full_attention_decode(f(q1), f(x["k"]), f(x["v"]), cache_len, block_size=bs, topk=topk,
                                           backend="reference", **full_kw(x))
    gs, gw = x["gs"][:, :, -1:], x["gw"][:, :, -1:]
    s_ref = F.sparse_attention_decode(f(q1), f(k_win), f(v_win), f(x["k"]), f(x["v"]), i_ref, cache_len,
                                      block_size=bs, window=w, gate_sparse=f(gs), gate_swa=f(gw), sinks=x["sinks"],
                                      backend="reference", **sparse_kw())
    for b in backends:
        o, i = F.full_attention_decode(q1, x["k"], x["v"], cache_len, block_size=bs, topk=topk, backend=b,
                                       **full_kw(x))
        record("decode.full", shape, S, b, errors(o, o_ref), {"indices_rows_equal": (i == i_ref).all(-1).float().mean().item()})
        s = F.sparse_attention_decode(q1, k_win, v_win, x["k"], x["v"], i_ref, cache_len, block_size=bs, window=w,
                                      gate_sparse=gs, gate_swa=gw, sinks=x["sinks"], backend=b, **sparse_kw())
        record("decode.sparse", shape, S, b, errors(s, s_ref))


def extend_inputs(x, R: int):
    """The last R tokens of `x` as an extend call over a linear cache holding all S tokens: start = S - R, the
    SWA keys are the own cache itself (win_pos = its positions)."""
    B, _, S, _ = x["q"].shape
    start = torch.full((B,), S - R, dtype=torch.int32, device=x["q"].device)
    win_pos = torch.arange(S, device=x["q"].device).expand(B, S).contiguous()
    tail = {n: x[n][:, :, -R:].contiguous() for n in ("q", "gs", "gw")}
    return start, win_pos, tail


def check_extend(x, shape, S, backends, bs, topk, w, R=512):
    """R new tokens against a filled cache (full and sparse layer) against the reference in float32."""
    start, win_pos, t = extend_inputs(x, R)
    f32 = {k: v.float() for k, v in x.items()}
    ft = {k: v.float() for k, v in t.items()}
    o_ref, i_ref = F.full_attention_extend(ft["q"], f32["k"], f32["v"], start, block_size=bs, topk=topk,
                                           backend="reference", **full_kw(f32))
    sp = lambda X, T_, b: F.sparse_attention_extend(  # noqa: E731
        T_["q"], X["k"], X["v"], i_ref, X["k_own"], X["v_own"], win_pos, start, block_size=bs, window=w,
        gate_sparse=T_["gs"], gate_swa=T_["gw"], sinks=X["sinks"], backend=b, **sparse_kw())
    s_ref = sp(f32, ft, "reference")
    for b in backends:
        o, i = F.full_attention_extend(t["q"], x["k"], x["v"], start, block_size=bs, topk=topk, backend=b,
                                       **full_kw(x))
        record(f"extend.full(R={R})", shape, S, b, errors(o, o_ref),
               {"indices_rows_equal": (i == i_ref).all(-1).float().mean().item()})
        record(f"extend.sparse(R={R})", shape, S, b, errors(sp(x, t, b), s_ref))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seqlens", default="4096,8192,32768")
    p.add_argument("--bwd-seqlens", default="4096,8192")
    p.add_argument("--shapes", default="32/8/128,64/4/128")
    p.add_argument("--backends", default="triton,flex")
    p.add_argument("--orders", default="token,block", help="Triton sparse-layer loop orders forced on top of auto")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, fp16, triton interpreted")
    p.add_argument("--softcap", type=float, default=None, help="every op soft-caps its logits (Gemma 2: 50)")
    p.add_argument("--full-sinks", action="store_true", help="the full-layer ops get per-head sinks (gpt-oss)")
    p.add_argument("--extend", type=int, default=512, help="R of the extend checks at the largest T (0: none)")
    p.add_argument("--full-fwd", default=None, metavar="VARIANT",
                   help="the full layer's forward as this variant of bench/full_fwd_variants.py (every full-layer op)")
    p.add_argument("--combine", default=None, choices=("separate", "fused"),
                   help="the block-major sparse forward's combine (default: the kernel module's BLOCK_COMBINE)")
    p.add_argument("--layout", default="contiguous", choices=("contiguous", "hf"),
                   help="hf: q/k/v/dout transposed views of [B, T, H, d], the gates views of one projection")
    variant_flags.add_token_tma_argument(p)
    args = p.parse_args(argv)
    kernel_options(args)
    ORDERS[:] = [o for o in args.orders.split(",") if o]
    PARAMS.update(softcap=args.softcap, full_sinks=args.full_sinks)
    if args.layout == "hf":
        PARAMS.setdefault("variant", []).append("hf")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device, dtype, bs, topk, w, B = "cuda", torch.bfloat16, 64, 1024, 128, 1
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        device, dtype, bs, topk, w, B = "cpu", torch.float16, 16, 32, 8, 2
        args.seqlens, args.bwd_seqlens, args.shapes = "70", "70", "8/2/16"
        args.extend = min(args.extend, 21)
    gen = torch.Generator(device=device).manual_seed(0)
    t0 = time.time()
    backends = args.backends.split(",")
    for shape in args.shapes.split(","):
        Hq, Hkv, d = map(int, shape.split("/"))
        for T in map(int, args.seqlens.split(",")):
            x = inputs(B if T < 32768 else 1, Hq, Hkv, T, d, dtype, device, gen, args.layout)
            check_forward(x, shape, T, backends, bs, topk, w)
            if str(T) in args.bwd_seqlens.split(","):
                check_backward(x, shape, T, backends, bs, topk, w)
            largest = T == max(map(int, args.seqlens.split(",")))
            x2 = inputs(2, Hq, Hkv, T, d, dtype, device, gen, args.layout) if largest else None
            if x2 is not None:
                check_decode(x2, shape, T, backends, bs, topk, w)
                if args.extend:
                    check_extend(x2, shape, T, backends, bs, topk, w,
                                 R=min(args.extend, T // 2))
            del x, x2
            if device == "cuda":
                torch.cuda.empty_cache()
    bad = [r for r in ROWS if not r["ok"]]
    fell_back = descriptor_fallbacks()
    if fell_back:  # a requested descriptor variant that did not build: its checks ran the pointer kernels
        print(f"descriptor kernels fell back to pointer loads: {fell_back}")
        bad.append({"fell_back": fell_back})
    print(f"\n{len(ROWS) - len(bad)} passed, {len(bad)} failed ({time.time() - t0:.0f} s); worst rel_l2 "
          f"{max(r['rel_l2'] for r in ROWS):.3e}, worst max_abs {max(r['max_abs'] for r in ROWS):.3e}")
    out = os.environ.get("OUT", os.path.join(os.path.dirname(__file__), "results"))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "check_gpu.json"), "w") as fh:
        json.dump({"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
                   "rows": ROWS}, fh, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
