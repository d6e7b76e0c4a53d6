"""Benchmark the HySparse ops against dense attention and NSA on one GPU, in one run (docs/benchmarks.md).

    python -m bench.bench_kernels [--quick] [--ops full,sparse,decode,stack] [--shapes 32/8/128]
        [--seqlens 8192,32768] [--long] [--backends triton,flex] [--no-bwd] [--no-check] [--budget-s 480] [--smoke]
        [--orders auto,token,block] [--recompute]

Records device, versions, date and copy bandwidth; then, bf16, B = 1, causal, block 64, topk 1024, window 128:
- prefill rows, forward and forward+backward: SDPA cuDNN, SDPA flash, Flex causal (all GQA); our full layer
  (attention + block scores + selection) and sparse layer (both branches, per-channel gates, sinks) for three
  selections (random per token, tile-correlated, the one our full layer produces), per backend; fla's NSA
  selected-attention kernel (G >= 16 only) on the same selections; the Triton sparse layer once per loop order in
  --orders (`sparse[triton]/<sel>` = the default "auto" dispatch, `sparse[triton:token]/<sel>` and
  `sparse[triton:block]/<sel>` forced token-major / K/V-block-major; docs/kernels_sparse.md);
- with --recompute, the sparse layer's fwd+bwd once more as the model runs it by default (`fwd+bwd+recompute`: the
  forward keeps no branch outputs, the backward recomputes them; SPEC §6's fwd+bwd target counts it);
- decode rows (B = 1 and 8, 32k and 128k caches): time, bytes that must be read, bandwidth vs copy bandwidth;
- a 1:3 stack (Schedule.hybrid(36, 3)) prefill vs 36 x cuDNN at 32k.
Each op is checked against the fp32 reference backend (chunked) before it is timed. Rows are ratios vs cuDNN of
the same run. Flex rows run last (compiles are slow); once --budget-s is spent the rest is recorded as skipped.
Writes bench_kernels.json and bench_kernels.png under $OUT (default bench/results/); prints a table.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import math
import os
import platform
import sys
import time
import traceback

import torch


from . import baselines as bl
from .timer import time_ms
from hysparse_compile.kernels import reference

T0 = time.time()
RESULTS: dict = {"meta": {}, "rows": []}


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------ configuration
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, reference/flex only: tests the harness")
    p.add_argument("--quick", action="store_true", help="T = 8k and 32k, 32k decode cache, shorter timing")
    p.add_argument("--ops", default="full,sparse,decode,stack")
    p.add_argument("--shapes", default=None, help="Hq/Hkv/d list, e.g. 32/8/128,64/4/128")
    p.add_argument("--seqlens", default=None, help="e.g. 8192,16384,32768")
    p.add_argument("--long", action="store_true", help="add T = 65536")
    p.add_argument("--backends", default=None, help="our backends to time (default triton,flex)")
    p.add_argument("--selections", default="random,tile,real")
    p.add_argument("--orders", default="auto", help="Triton sparse-layer loop orders to time: auto,token,block")
    p.add_argument("--decode-batches", default=None, help="default 1,8 (--smoke: 1,2)")
    p.add_argument("--decode-caches", default=None, help="default 32768,131072 (--quick: 32768)")
    p.add_argument("--no-bwd", action="store_true", help="forward rows only")
    p.add_argument("--recompute", action="store_true",
                   help="also time the sparse layer's fwd+bwd as the model runs it by default (mode "
                        "fwd+bwd+recompute: the forward keeps no branch outputs, the backward recomputes them; "
                        "ratios against cuDNN's fwd+bwd)")
    p.add_argument("--no-check", action="store_true", help="skip the fp32 reference checks")
    p.add_argument("--budget-s", type=float, default=480.0, help="stop timing new rows after this many seconds")
    p.add_argument("--trained", default=None,
                   help="selections.npz of the paper miniature (examples/paper_miniature/dump_selections.py): adds "
                        "the 'trained' selection (its layers as KV heads); its shape needs --topk 512 and T <= 4096")
    p.add_argument("--topk", type=int, default=None, help="override the top-k (default 1024; --smoke 64)")
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results"))
    a = p.parse_args(argv)
    topk = a.topk
    a.ops = set(a.ops.split(","))
    if a.smoke:
        a.device, a.dtype = torch.device("cpu"), torch.float32
        a.block, a.topk, a.window = 16, 64, 32
        a.shapes = a.shapes or "4/1/32,16/1/32"
        a.seqlens = a.seqlens or "96,200"
        a.backends = a.backends or "reference,flex"
        a.decode_caches = a.decode_caches or "256"
        a.decode_batches = a.decode_batches or "1,2"
        a.stack_T, a.base = 96, "sdpa_math"
    else:
        a.device, a.dtype = torch.device("cuda"), torch.bfloat16
        a.block, a.topk, a.window = 64, 1024, 128
        a.shapes = a.shapes or "32/8/128,64/4/128"
        a.seqlens = a.seqlens or ("8192,32768" if a.quick else "8192,16384,32768")
        a.backends = a.backends or "triton,flex"
        a.decode_caches = a.decode_caches or ("32768" if a.quick else "32768,131072")
        a.decode_batches = a.decode_batches or "1,8"
        a.stack_T, a.base = 32768, "sdpa_cudnn"
    a.topk = topk or a.topk
    if a.trained and "trained" not in a.selections:
        a.selections += ",trained"
    a.shapes = [tuple(int(x) for x in s.split("/")) for s in a.shapes.split(",")]
    a.seqlens = [int(x) for x in a.seqlens.split(",")] + ([65536] if a.long else [])
    a.backends = a.backends.split(",")
    a.selections = a.selections.split(",")
    a.orders = a.orders.split(",")
    assert set(a.orders) <= {"auto", "token", "block"}, a.orders
    a.decode_batches = [int(x) for x in a.decode_batches.split(",")]
    a.decode_caches = [int(x) for x in a.decode_caches.split(",")]
    a.rep_ms = 10 if a.smoke else 50 if a.quick else 100
    return a


def time_left(args) -> bool:
    return time.time() - T0 < args.budget_s


# ------------------------------------------------------------------------------------------------ backends
_BACKENDS: dict = {}


def backend(name: str):
    """The backend module, imported lazily; an import error is returned (not raised) so the row records it."""
    if name not in _BACKENDS:
        try:
            _BACKENDS[name] = importlib.import_module(f"hysparse_compile.kernels.{name}")
        except Exception as e:  # the triton backend may not exist yet
            _BACKENDS[name] = e
    return _BACKENDS[name]


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


# ------------------------------------------------------------------------------------------------ inputs
def make_prefill(args, Hq, Hkv, d, T, seed):
    """One input set: full layer (q_full, k_sh, v_sh), sparse layer (q, k_own, v_own, gates, sinks), douts."""
    g = torch.Generator(device=args.device).manual_seed(seed)
    dev, dt = args.device, args.dtype
    rn = lambda *s: torch.randn(*s, device=dev, dtype=dt, generator=g)  # noqa: E731
    B = 1
    s = dict(q_full=rn(B, Hq, T, d), k_sh=rn(B, Hkv, T, d), v_sh=rn(B, Hkv, T, d), q=rn(B, Hq, T, d),
             k_own=rn(B, Hkv, T, d), v_own=rn(B, Hkv, T, d), dout=rn(B, Hq, T, d))
    s["gate_sp"] = torch.sigmoid(rn(B, Hq, T, d))  # per-channel gates (the default gate="element")
    s["gate_swa"] = torch.sigmoid(rn(B, Hq, T, d))
    s["sinks"] = torch.randn(Hq, device=dev, generator=g).to(dt)
    return s


def random_selection(B, Hkv, T, bs, nsel, device, g, tile_pool: int = 0):
    """int32 [B, Hkv, T, nsel], sorted, -1 padded, causal candidates only.
    tile_pool = 0: each token draws its own blocks; > 0: each 64-token tile draws a pool of tile_pool blocks and
    its tokens draw from that pool (neighbours mostly agree, as real selections tend to)."""
    nb = -(-T // bs)
    out = torch.empty(B, Hkv, T, nsel, dtype=torch.int32, device=device)
    blocks = torch.arange(nb, device=device)
    step = max(64, (1 << 24) // max(1, B * Hkv * nb) // 64 * 64)
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        pos = torch.arange(t0, t1, device=device)
        cand = blocks.view(1, -1) * bs <= pos.view(-1, 1)  # [C, nb]
        keys = torch.rand(B, Hkv, t1 - t0, nb, device=device, generator=g)
        if tile_pool:
            tiles = pos // 64
            tkeys = torch.rand(B, Hkv, int(tiles.max()) + 1, nb, device=device, generator=g)
            tile_start = torch.arange(int(tiles.max()) + 1, device=device) * 64
            tkeys = torch.where(blocks.view(1, -1) * bs <= tile_start.view(-1, 1), tkeys, -1.0)
            pool = torch.zeros_like(tkeys, dtype=torch.bool).scatter_(-1, tkeys.topk(min(tile_pool, nb)).indices, True)
            pool = pool[:, :, tiles]  # [B, Hkv, C, nb]
            pool[..., :] |= (blocks.view(1, -1) == (pos // bs).view(-1, 1))  # own block always in the pool
            keys = torch.where(pool, keys + 1.0, keys)  # pool members first, others only if the pool is short
        keys = torch.where(cand, keys, -1.0)
        top = keys.topk(min(nsel, nb), dim=-1)
        idx = torch.where(top.values >= 0, top.indices, nb).sort(-1).values
        idx = torch.where(idx == nb, -1, idx).to(torch.int32)
        if idx.shape[-1] < nsel:
            idx = torch.cat([idx, idx.new_full((*idx.shape[:3], nsel - idx.shape[-1]), -1)], -1)
        out[:, :, t0:t1] = idx
    return out


def last_row_selection(B, Hkv, S, bs, nsel, device, g):
    """int32 [B, Hkv, 1, nsel]: distinct random blocks for the token at S - 1 (every block is a candidate)."""
    keys = torch.rand(B, Hkv, 1, -(-S // bs), device=device, generator=g)
    return keys.topk(nsel, dim=-1).indices.sort(-1).values.to(torch.int32)


def trained_selection(path, B, Hkv, T, nsel, device):
    """The selections a trained full layer made (the paper miniature's `selections.npz`, int16 [Hkv_m, T_m, nsel_m]
    per run and layer), as indices [B, Hkv, T, nsel]: KV head h takes the (h mod L)-th stored layer, every batch row
    the same. -> (indices, description) or (None, why not)."""
    import numpy as np

    data = np.load(path)
    layers = [k for k in data.files if k.endswith("_indices")]
    if not layers:
        return None, f"{path} holds no '<run>/layer<L>_indices' arrays"
    arrays = [data[k][0] for k in layers]  # first KV group of each layer: [T_m, nsel_m]
    t_m, nsel_m = arrays[0].shape
    if nsel_m != nsel or T > t_m:
        return None, (f"{path} has T={t_m}, nsel={nsel_m}; this row needs nsel={nsel} and T={T} <= {t_m} "
                      f"(run with --topk {nsel_m * 64} --seqlens {t_m})")
    heads = np.stack([arrays[h % len(arrays)][:T] for h in range(Hkv)])  # [Hkv, T, nsel]
    idx = torch.from_numpy(heads.astype(np.int32)).to(device).unsqueeze(0).expand(B, -1, -1, -1).contiguous()
    return idx, f"trained full layers ({len(layers)} layers of the miniature as KV heads)"


def selections(args, s, seed):
    """name -> (indices, how they were made)."""
    B, Hkv, T, _ = s["k_sh"].shape
    nsel = args.topk // args.block
    g = torch.Generator(device=args.device).manual_seed(seed + 1)
    res = {}
    if "random" in args.selections:
        res["random"] = (random_selection(B, Hkv, T, args.block, nsel, args.device, g), "uniform per token")
    if "tile" in args.selections:
        res["tile"] = (random_selection(B, Hkv, T, args.block, nsel, args.device, g, tile_pool=2 * nsel),
                       f"per 64-token tile pool of {2 * nsel} blocks")
    if "trained" in args.selections and args.trained:
        idx, why = trained_selection(args.trained, B, Hkv, T, nsel, args.device)
        if idx is None:
            log(f"trained selection skipped: {why}")
        else:
            res["trained"] = (idx, why)
    if "real" in args.selections:
        for name in [b for b in ("triton", "flex", "reference") if b in args.backends] + ["reference"]:
            impl = backend(name)
            if isinstance(impl, Exception):
                continue
            try:
                idx = impl.full_attention_fwd(s["q_full"], s["k_sh"], s["v_sh"], args.block, args.topk,
                                              1 / math.sqrt(s["q"].shape[-1]), False)[1]
                res["real"] = (idx, f"our full layer ({name})")
                break
            except Exception as e:  # noqa: BLE001
                log(f"real selection with {name} failed: {_err(e)}")
    return res


# ------------------------------------------------------------------------------------------------ checks
def rel_err(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def f32(*ts):
    return [None if t is None else t.float() for t in ts]


def check_full(impl, s, args, ref_cache):
    q, k, v = s["q_full"], s["k_sh"], s["v_sh"]
    scale = 1 / math.sqrt(q.shape[-1])
    if "full" not in ref_cache:
        ref_cache["full"] = reference.full_attention_fwd(*f32(q, k, v), args.block, args.topk, scale, False)
    r_out, r_idx, r_lse, _ = ref_cache["full"]
    out, idx, lse, _ = impl.full_attention_fwd(q, k, v, args.block, args.topk, scale, False)
    agree = float((idx == r_idx).all(-1).float().mean())
    return {"out_rel_err": rel_err(out, r_out), "lse_max_abs_err": float((lse - r_lse).abs().max()),
            "indices_rows_equal": agree}


def sparse_args(s, idx, args, merge=False):
    return (s["q"], s["k_own"], s["v_own"], s["k_sh"], s["v_sh"], idx, s["gate_sp"], s["gate_swa"], s["sinks"],
            args.block, args.window, 1 / math.sqrt(s["q"].shape[-1]), merge)


def order_kw(b, order):
    """sparse_attention_fwd keyword for the loop order: only the Triton backend has one; "auto" is its default."""
    return {} if b != "triton" or order == "auto" else {"order": order}


def auto_order(idx, Hq):
    """What the Triton forward's "auto" dispatch picks for this selection (its rule, run once outside timing)."""
    tsa = importlib.import_module("hysparse_compile.kernels.triton.sparse_attention")
    from hysparse_compile.kernels.triton.block_union import tile_block_union, tokens_per_tile

    G = Hq // idx.shape[1]
    order = tsa.DEFAULT_ORDER
    if order == "auto":
        count = tile_block_union(idx, tokens_per_tile(G))[2]
        order = tsa.choose_order(count, idx.shape[-1], idx.shape[2], G)
        return f"auto -> {order} (mean tile union {count.float().mean().item():.1f}, nsel {idx.shape[-1]})"
    return f"default order {order}"


def check_sparse(impl, s, idx, args, ref_cache, key, okw=None):
    a = sparse_args(s, idx, args)
    if key not in ref_cache:
        fa = (*f32(*a[:5]), idx, *f32(*a[6:9]), *a[9:])
        ref_cache[key] = reference.sparse_attention_fwd(*fa, False)[0]
    out = impl.sparse_attention_fwd(*a, False, **(okw or {}))[0]
    return {"out_rel_err": rel_err(out, ref_cache[key])}


def check_ok(check: dict | None) -> bool:
    return check is None or check.get("out_rel_err", 0.0) < 2e-2


# ------------------------------------------------------------------------------------------------ rows
def add_row(args, **row):
    if row.get("ms") is not None and row.get("base_ms"):
        row["t_over_base"] = row["ms"] / row["base_ms"]
        row["speedup"] = row["base_ms"] / row["ms"]
    RESULTS["rows"].append(row)
    save_json(args)
    ms = f"{row['ms']:.3f} ms" if row.get("ms") is not None else "-"
    extra = f" base/t={row['speedup']:.2f}" if row.get("speedup") else ""
    chk = f" check={row['check']}" if row.get("check") else ""
    err = f" ERROR {row['error']}" if row.get("error") else ""
    log(f"{row['section']:7s} {row.get('shape', '')} T={row.get('T', '')} B={row.get('B', 1)} {row['op']:24s} "
        f"{row['mode']:7s} {ms}{extra}{chk}{err}")


def timed_row(args, base_ms, build, check=None, note_fn=None, **key):
    """build() -> (fn, grad_to_none); check() -> dict. Records a row; never raises."""
    if not time_left(args):
        return add_row(args, **key, ms=None, error="skipped: time budget spent")
    row = dict(key)
    try:
        if check is not None and not args.no_check:
            row["check"] = {k: round(v, 6) for k, v in check().items()}
            if not check_ok(row["check"]):
                row["check_failed"] = True
        fn, gtn = build()
        row["ms"] = time_ms(fn, args.device, grad_to_none=gtn, rep_ms=args.rep_ms)
        if note_fn is not None and note_fn():
            row["note"] = note_fn()
    except Exception as e:  # noqa: BLE001
        row["error"] = _err(e)
        if os.environ.get("BENCH_TRACEBACK"):
            traceback.print_exc()
        if args.device.type == "cuda":
            torch.cuda.empty_cache()
    add_row(args, base_ms=base_ms, **row)
    return row.get("ms")


def prefill_rows(args, Hq, Hkv, d, T, pass_no):
    """pass 0: baselines, non-flex backends, NSA; pass 1: flex backend rows."""
    if not time_left(args):
        return add_row(args, section="prefill", shape=f"{Hq}/{Hkv}/{d}", T=T, op="*", mode="*", ms=None,
                       error=f"skipped: time budget spent (pass {pass_no})")
    seed = T * 131 + Hq * 7 + Hkv
    sets = [make_prefill(args, Hq, Hkv, d, T, seed + i) for i in range(2)]
    rotor = bl.Rotor(sets)
    shape, scale = f"{Hq}/{Hkv}/{d}", 1 / math.sqrt(d)
    sel = selections(args, sets[0], seed)
    sel_sets = {n: [idx] + [idx] for n, (idx, _) in sel.items()}  # same selection for both sets
    modes = ["fwd"] if args.no_bwd else ["fwd", "fwd+bwd"] + (["fwd+bwd+recompute"] if args.recompute else [])
    ref_cache: dict = {}
    base = RESULTS.setdefault("base_ms", {})
    ours = [b for b in args.backends if (b == "flex") == (pass_no == 1)]
    for mode in modes:
        bwd = mode.startswith("fwd+bwd")
        recompute = mode == "fwd+bwd+recompute"  # sparse rows only, against the fwd+bwd baselines above
        key = f"{shape}/{T}/{'fwd+bwd' if bwd else 'fwd'}"
        # baselines see the full layer's inputs, as fresh autograd leaves when timed with backward
        def dense_sets(bwd=bwd):
            leaves = lambda x: tuple(x[n].detach().requires_grad_(bwd) for n in ("q_full", "k_sh", "v_sh"))  # noqa
            return bl.Rotor([leaves(x) + (x["dout"],) for x in sets])

        if pass_no == 1 and not recompute:
            frot = dense_sets()
            timed_row(args, base.get(key), lambda: bl.flex_causal_call(frot, bwd, scale), section="prefill",
                      shape=shape, T=T, op="flex_causal", mode=mode)
        if pass_no == 0 and not recompute:
            names = ["sdpa_math"] if args.smoke else ["sdpa_cudnn", "sdpa_flash"]
            for name in names:
                brot = dense_sets()
                ms = timed_row(args, base.get(key), lambda n=name, r=brot: bl.sdpa_call(n.split("_")[1], r, bwd),
                               note_fn=lambda r=brot: r.note, section="prefill", shape=shape, T=T, op=name,
                               mode=mode)
                if name == args.base and ms is not None:
                    base[key] = ms
        for b in ours:
            impl = backend(b)
            if "full" in args.ops and not recompute:
                if isinstance(impl, Exception):
                    add_row(args, section="prefill", shape=shape, T=T, op=f"full[{b}]", mode=mode, ms=None,
                            error=_err(impl))
                else:
                    timed_row(args, base.get(key), lambda: full_call(impl, rotor, args, bwd),
                              (lambda: check_full(impl, sets[0], args, ref_cache)) if not bwd else None,
                              section="prefill", shape=shape, T=T, op=f"full[{b}]", mode=mode)
            if "sparse" in args.ops:
                for sname, (idx, how) in sel.items():
                    for order in (args.orders if b == "triton" else ["auto"]):
                        op = f"sparse[{b}]/{sname}" if order == "auto" else f"sparse[{b}:{order}]/{sname}"
                        if isinstance(impl, Exception):
                            add_row(args, section="prefill", shape=shape, T=T, op=op, mode=mode, ms=None,
                                    error=_err(impl))
                            break
                        okw = order_kw(b, order)
                        note = (lambda idx=idx: auto_order(idx, Hq)) if b == "triton" and order == "auto" else None
                        timed_row(args, base.get(key),
                                  lambda okw=okw, sname=sname: sparse_call(impl, rotor, sel_sets[sname], args, bwd,
                                                                           okw, recompute),
                                  (lambda okw=okw, idx=idx, sname=sname: check_sparse(impl, sets[0], idx, args,
                                                                                      ref_cache, sname, okw))
                                  if not bwd else None, note_fn=note,
                                  section="prefill", shape=shape, T=T, op=op, mode=mode, selection=how, order=order)
        if pass_no == 0 and "sparse" in args.ops and Hq // Hkv >= 16 and not recompute:
            why = bl.nsa_available()
            if why:
                if mode == "fwd":
                    print("NSA baseline skipped: fla not installed", flush=True)
                add_row(args, section="prefill", shape=shape, T=T, op="nsa[fla]", mode=mode, ms=None, error=why)
                continue
            for sname, (idx, how) in sel.items():
                x = sets[0]
                qt, kt, vt, it = bl.nsa_inputs(x["q"], x["k_sh"], x["v_sh"], idx)
                if bwd:
                    qt, kt, vt = (t.requires_grad_() for t in (qt, kt, vt))
                dt = x["dout"].transpose(1, 2).contiguous()
                chk = None
                if not bwd and T == min(args.seqlens):
                    chk = lambda qt=qt, kt=kt, vt=vt, it=it, idx=idx: check_nsa(qt, kt, vt, it, x, idx, args)  # noqa
                timed_row(args, base.get(key),
                          lambda qt=qt, kt=kt, vt=vt, it=it, dt=dt: bl.nsa_call(qt, kt, vt, it, args.block, scale,
                                                                              bwd, dt),
                          chk, section="prefill", shape=shape, T=T, op=f"nsa[fla]/{sname}", mode=mode,
                          selection=how, note="selected branch only")
    del sets, rotor, sel, sel_sets, ref_cache


def full_call(impl, rotor, args, bwd):
    def fwd():
        s = rotor.next()
        return impl.full_attention_fwd(s["q_full"], s["k_sh"], s["v_sh"], args.block, args.topk,
                                       1 / math.sqrt(s["q"].shape[-1]), False)

    if not bwd:
        return fwd, None

    def fwd_bwd():
        s = rotor.sets[rotor.i % len(rotor.sets)]
        out, _, lse, _ = fwd()
        impl.full_attention_bwd(s["dout"], s["q_full"], s["k_sh"], s["v_sh"], out, lse,
                                1 / math.sqrt(s["q"].shape[-1]))

    return fwd_bwd, None


def sparse_call(impl, rotor, idx_sets, args, bwd, okw=None, recompute=False):
    """bwd: forward then backward; the forward keeps its branch outputs for the backward (save_branches=True), or,
    with recompute, keeps nothing and the backward gets them empty, as `hysparse::sparse_attention`'s autograd
    passes them by default (ops.py: neither `out` nor the branch outputs are saved; the backend recomputes)."""
    okw = okw or {}

    def fwd_bwd():
        i = rotor.i % len(rotor.sets)
        s = rotor.next()
        a = sparse_args(s, idx_sets[i], args)
        out, lse, br = impl.sparse_attention_fwd(*a, bwd and not recompute, **okw)
        if recompute:
            out, br = out.new_empty(0), out.new_empty(0)
        if bwd:
            impl.sparse_attention_bwd(s["dout"], *a[:9], out, lse, br, *a[9:], **okw)

    return fwd_bwd, None


def check_nsa(qt, kt, vt, it, s, idx, args):
    """NSA output vs the reference sparse branch alone (no window, gate or sink)."""
    from fla.ops.nsa.parallel import ParallelNSAFunction

    with torch.no_grad():
        o = ParallelNSAFunction.apply(qt, kt, vt, it, it.shape[-1], args.block, 1 / math.sqrt(qt.shape[-1]), None)
    q, k, v = f32(s["q"], s["k_sh"], s["v_sh"])
    ref = reference.sparse_attention_fwd(q, k, v, k, v, idx, None, None, None, args.block, 0,
                                         1 / math.sqrt(q.shape[-1]), False, False)[0]
    return {"out_rel_err": rel_err(o.transpose(1, 2), ref)}


# ------------------------------------------------------------------------------------------------ decode
def decode_rows(args, Hq, Hkv, d, B, S, l2_bytes, copy_gbps):
    """Full-layer and sparse-layer decode at cache length S vs SDPA over the same cache."""
    shape, scale, elt = f"{Hq}/{Hkv}/{d}", 1 / math.sqrt(d), torch.finfo(args.dtype).bits // 8
    nsel, W = args.topk // args.block, args.window
    kv_bytes = 2 * B * Hkv * S * d * elt
    n_sets = int(max(2, min(8, math.ceil(4 * l2_bytes / kv_bytes), (16 << 30) // max(1, kv_bytes))))
    g = torch.Generator(device=args.device).manual_seed(S + B)
    rn = lambda *s: torch.randn(*s, device=args.device, dtype=args.dtype, generator=g)  # noqa: E731
    sets = []
    for _ in range(n_sets):
        sets.append(dict(q=rn(B, Hq, 1, d), k=rn(B, Hkv, S, d), v=rn(B, Hkv, S, d), k_win=rn(B, Hkv, W, d),
                         v_win=rn(B, Hkv, W, d), gate_sp=torch.sigmoid(rn(B, Hq, 1, d)),
                         gate_swa=torch.sigmoid(rn(B, Hq, 1, d)), sinks=rn(Hq),
                         idx=last_row_selection(B, Hkv, S, args.block, nsel, args.device, g)))
    cache_len = torch.full((B,), S, dtype=torch.int32, device=args.device)
    rotor = bl.Rotor(sets)
    key = f"decode/{shape}/{B}/{S}"
    sp_bytes = 2 * B * Hkv * (nsel * args.block + W) * d * elt + 4 * B * Hq * d * elt  # blocks + window + q/gates/out
    common = dict(section="decode", shape=shape, T=S, B=B)

    def bw(row_ms, nbytes):
        return None if row_ms is None else nbytes / (row_ms * 1e-3) / 1e9

    def sdpa():
        x = rotor.next()
        return torch.nn.functional.scaled_dot_product_attention(x["q"], x["k"], x["v"], enable_gqa=Hq != Hkv)

    ms = timed_row(args, None, lambda: (sdpa, None), **common, op="sdpa_decode", mode="decode", bytes=kv_bytes)
    base = ms
    _fill_bw(bw(ms, kv_bytes), copy_gbps)
    for b in args.backends:
        impl = backend(b)
        if isinstance(impl, Exception):
            add_row(args, **common, op=f"full_decode[{b}]", mode="decode", ms=None, error=_err(impl))
            add_row(args, **common, op=f"sparse_decode[{b}]", mode="decode", ms=None, error=_err(impl))
            continue

        def full_dec(impl=impl):
            x = rotor.next()
            return impl.full_attention_decode(x["q"], x["k"], x["v"], cache_len, args.block, args.topk, scale)

        def sparse_dec(impl=impl):
            x = rotor.next()
            return impl.sparse_attention_decode(x["q"], x["k_win"], x["v_win"], x["k"], x["v"], x["idx"], cache_len,
                                                x["gate_sp"], x["gate_swa"], x["sinks"], args.block, W, scale, False)

        def chk_full(impl=impl):
            x = sets[0]
            o, i = impl.full_attention_decode(x["q"], x["k"], x["v"], cache_len, args.block, args.topk, scale)
            ro, ri = reference.full_attention_decode(*f32(x["q"], x["k"], x["v"]), cache_len, args.block, args.topk,
                                                     scale)
            return {"out_rel_err": rel_err(o, ro), "indices_rows_equal": float((i == ri).all(-1).float().mean())}

        def chk_sparse(impl=impl):
            x = sets[0]
            a = (x["q"], x["k_win"], x["v_win"], x["k"], x["v"], x["idx"], cache_len, x["gate_sp"], x["gate_swa"],
                 x["sinks"])
            o = impl.sparse_attention_decode(*a, args.block, W, scale, False)
            fa = (*f32(*a[:5]), a[5], a[6], *f32(*a[7:]))
            return {"out_rel_err": rel_err(o, reference.sparse_attention_decode(*fa, args.block, W, scale, False))}

        for op, fn, chk, nbytes in ((f"full_decode[{b}]", full_dec, chk_full, kv_bytes),
                                    (f"sparse_decode[{b}]", sparse_dec, chk_sparse, sp_bytes)):
            ms = timed_row(args, base, lambda fn=fn: (fn, None), chk, **common, op=op, mode="decode", bytes=nbytes)
            _fill_bw(bw(ms, nbytes), copy_gbps)
    del sets, rotor


def _fill_bw(gbps, copy_gbps):
    row = RESULTS["rows"][-1]
    if gbps is not None:
        row["GBps"] = round(gbps, 1)
        row["bw_vs_copy"] = round(gbps / copy_gbps, 3)


# ------------------------------------------------------------------------------------------------ 1:3 stack
def stack_rows(args, Hq, Hkv, d, backends, with_base=True):
    """Attention of Schedule.hybrid(36, 3) (10 full + 26 sparse layers) at T = args.stack_T vs 36 x base."""
    from hysparse_compile.schedule import Schedule

    layers = Schedule.hybrid(36, 3).layers
    T, shape, scale = args.stack_T, f"{Hq}/{Hkv}/{d}", 1 / math.sqrt(d)
    pool = [make_prefill(args, Hq, Hkv, d, T, 7000 + i) for i in range(3)]  # layer i uses set i % 3
    common = dict(section="stack", shape=shape, T=T, mode="fwd")
    sdpa = bl.sdpa(args.base.split("_")[1])

    def dense():
        for i in range(len(layers)):
            x = pool[i % len(pool)]
            sdpa(x["q_full"], x["k_sh"], x["v_sh"])

    base = RESULTS.setdefault("base_ms", {}).get("stack")
    if with_base:
        base = timed_row(args, None, lambda: (dense, None), **common, op=f"36x {args.base}",
                         note=f"{sum(x.role == 'full' for x in layers)} full + "
                              f"{sum(x.role == 'sparse' for x in layers)} sparse")
        RESULTS["base_ms"]["stack"] = base
    for b in backends:
        impl = backend(b)
        if isinstance(impl, Exception):
            add_row(args, **common, op=f"hybrid(36,3)[{b}]", ms=None, error=_err(impl))
            continue

        def stack(impl=impl):
            src = {}
            for i, spec in enumerate(layers):
                x = pool[i % len(pool)]
                if spec.role == "full":
                    _, idx, _, _ = impl.full_attention_fwd(x["q_full"], x["k_sh"], x["v_sh"], args.block, args.topk,
                                                           scale, False)
                    src[spec.index] = (x["k_sh"], x["v_sh"], idx)
                else:
                    k, v, idx = src[spec.kv_source]
                    impl.sparse_attention_fwd(x["q"], x["k_own"], x["v_own"], k, v, idx, x["gate_sp"], x["gate_swa"],
                                              x["sinks"], args.block, args.window, scale, False, False)

        timed_row(args, base, lambda stack=stack: (stack, None), **common, op=f"hybrid(36,3)[{b}]")
    del pool


# ------------------------------------------------------------------------------------------------ report
def save_json(args):
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_kernels.json"), "w") as f:
        json.dump(RESULTS, f, indent=1, default=str)


def print_table(args):
    cols = ["section", "shape", "T", "B", "op", "mode", "ms", "t/base", "base/t", "GB/s", "bw/copy", "check", "note"]

    def cells(r):
        chk = r.get("check") or {}
        c = " ".join(f"{k.split('_')[0]}={v:.2g}" for k, v in chk.items()) + (" FAIL" if r.get("check_failed") else "")
        return [r["section"], r.get("shape", ""), str(r.get("T", "")), str(r.get("B", 1)), r["op"], r["mode"],
                "-" if r.get("ms") is None else f"{r['ms']:.3f}",
                f"{r['t_over_base']:.3f}" if r.get("t_over_base") else "", f"{r['speedup']:.2f}" if r.get("speedup")
                else "", str(r.get("GBps", "")), str(r.get("bw_vs_copy", "")), c,
                (r.get("error") or r.get("note") or r.get("selection") or "")[:60]]

    order = {"prefill": 0, "decode": 1, "stack": 2}
    ranked = sorted(RESULTS["rows"], key=lambda r: (order.get(r["section"], 3), r.get("shape", ""), r.get("mode", ""),
                                                    r.get("T", 0), r.get("B", 1)))
    rows = [cells(r) for r in ranked]
    title = f"HySparse kernels vs {args.base} ({RESULTS['meta'].get('device')}); t/base < 1 is faster"
    try:
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        t = Table(title=title)
        for c in cols:
            t.add_column(c)
        for r in rows:
            t.add_row(*(Text(c) for c in r))  # Text: "[triton]" is not markup
        Console(width=240).print(t)
    except ImportError:
        print(title)
        widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
        for r in [cols] + rows:
            print("  ".join(x.ljust(w) for x, w in zip(r, widths)))


def print_summary(args):
    """One line per (shape, T, mode): what docs/benchmarks.md reports, short enough to survive a truncated log tail."""
    rows = [r for r in RESULTS["rows"] if r["section"] == "prefill" and r.get("speedup")]
    print(f"\nSummary (base/t = how many times faster than {args.base}; full layer: t/base):")
    for key in sorted({(r["shape"], r["T"], r["mode"]) for r in rows}, key=lambda k: (k[0], k[2], k[1])):
        sub = [r for r in rows if (r["shape"], r["T"], r["mode"]) == key]
        full = " ".join(f"{r['op']} t/base={r['t_over_base']:.2f}" for r in sub if r["op"].startswith("full"))
        other = " ".join(f"{r['op']}={r['speedup']:.1f}x" for r in sub if not r["op"].startswith("full"))
        print(f"  {key[0]} T={key[1]} {key[2]}: {full} | {other}")
    for r in RESULTS["rows"]:
        if r["section"] in ("decode", "stack") and r.get("ms") is not None:
            bw = f" {r['GBps']} GB/s ({r['bw_vs_copy']:.2f} of copy)" if r.get("GBps") else ""
            sp = f" base/t={r['speedup']:.2f}" if r.get("speedup") else ""
            print(f"  {r['section']} {r['shape']} T={r['T']} B={r.get('B', 1)} {r['op']}: {r['ms']:.3f} ms{sp}{bw}")


def plot(args):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no plot")
        return
    pre = [r for r in RESULTS["rows"] if r["section"] == "prefill" and r.get("ms")]
    shapes = sorted({r["shape"] for r in pre})
    modes = sorted({r["mode"] for r in pre})
    if not pre:
        return
    fig, axes = plt.subplots(len(shapes), len(modes), figsize=(7 * len(modes), 5 * len(shapes)), squeeze=False)
    for i, shape in enumerate(shapes):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            sub = [r for r in pre if r["shape"] == shape and r["mode"] == mode]
            for op in sorted({r["op"] for r in sub}):
                pts = sorted((r["T"], r["ms"]) for r in sub if r["op"] == op)
                style = "--" if op.startswith(("sdpa", "flex_causal")) else "-"
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=op)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("T")
            ax.set_ylabel("ms")
            ax.set_title(f"{shape} {mode}")
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "bench_kernels.png"), dpi=110)
    log(f"plot: {os.path.join(args.out, 'bench_kernels.png')}")


def record_meta(args):
    dev = args.device
    meta = RESULTS["meta"]
    meta.update(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                command=" ".join([os.path.basename(sys.executable)] + sys.argv), python=platform.python_version(),
                torch=torch.__version__, dtype=str(args.dtype), block_size=args.block, topk=args.topk,
                window=args.window, base=args.base)
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    try:
        import fla

        meta["fla"] = getattr(fla, "__version__", "?")
    except ImportError:
        meta["fla"] = None
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        meta.update(device=p.name, sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                    l2_bytes=getattr(p, "L2_cache_size", 50 << 20))
    else:
        meta.update(device=f"cpu ({platform.processor() or platform.machine()})", l2_bytes=8 << 20)
    meta["copy_GBps"] = round(bl.copy_bandwidth(dev), 1)
    log(f"device {meta['device']}, torch {meta['torch']}, triton {meta['triton']}, fla {meta['fla']}, "
        f"copy {meta['copy_GBps']} GB/s (read + write)")


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(0)
    if args.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    record_meta(args)
    save_json(args)
    prefill = args.ops & {"full", "sparse"}
    for pass_no in (0, 1):
        if pass_no == 1 and "flex" not in args.backends:
            break
        # flex compiles each (shape, T, mask) anew: in its pass the reported sizes (32k, 8k) go first
        seqlens = args.seqlens if pass_no == 0 else sorted(args.seqlens, key=lambda t: (t != 32768, t != 8192, t))
        for Hq, Hkv, d in args.shapes if prefill else []:
            for T in seqlens:
                try:
                    prefill_rows(args, Hq, Hkv, d, T, pass_no)
                except Exception as e:  # noqa: BLE001 - input creation OOM and the like
                    add_row(args, section="prefill", shape=f"{Hq}/{Hkv}/{d}", T=T, op="*", mode="*", ms=None,
                            error=_err(e))
                if args.device.type == "cuda":
                    torch.cuda.empty_cache()
                save_json(args)
        if pass_no == 0 and "decode" in args.ops:
            decode_phase(args)
        if "stack" in args.ops:
            stack_phase(args, pass_no)
        save_json(args)
    save_json(args)
    print_table(args)
    print_summary(args)
    plot(args)
    log(f"results: {os.path.join(args.out, 'bench_kernels.json')}")


def decode_phase(args):
    for Hq, Hkv, d in args.shapes:
        for S in args.decode_caches:
            for B in args.decode_batches:
                try:
                    decode_rows(args, Hq, Hkv, d, B, S, RESULTS["meta"]["l2_bytes"], RESULTS["meta"]["copy_GBps"])
                except Exception as e:  # noqa: BLE001
                    add_row(args, section="decode", shape=f"{Hq}/{Hkv}/{d}", T=S, B=B, op="*", mode="decode",
                            ms=None, error=_err(e))
                if args.device.type == "cuda":
                    torch.cuda.empty_cache()


def stack_phase(args, pass_no=0):
    Hq, Hkv, d = args.shapes[0]
    if not time_left(args):
        return add_row(args, section="stack", shape=f"{Hq}/{Hkv}/{d}", T=args.stack_T, op="*", mode="fwd", ms=None,
                       error=f"skipped: time budget spent (pass {pass_no})")
    try:
        stack_rows(args, Hq, Hkv, d, [b for b in args.backends if (b == "flex") == (pass_no == 1)], pass_no == 0)
    except Exception as e:  # noqa: BLE001
        add_row(args, section="stack", shape=f"{Hq}/{Hkv}/{d}", T=args.stack_T, op="*", mode="fwd", ms=None,
                error=_err(e))


if __name__ == "__main__":
    main()
