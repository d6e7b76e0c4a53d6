"""Decode on the lent GPU, end to end through the compiled model and its HySparseCache (docs/benchmarks.md, Decode).

An HF Llama at the paper's 7B attention shape (hidden 4096, 8 layers, Hq/Hkv/d 32/8/128, intermediate 11008, vocab
32000, random weights, bf16), `Schedule.hybrid(8, 3)` (block 64, topk 1024, window 128), against, in the same run:
- `dense_floor`: the same model with every layer full (`"F" * 8`), decoded through our GQA-aware full-layer decode
  kernel (it reads un-repeated caches; its block scores and selection are ~free in registers) — the bandwidth floor
  of full attention;
- `hf_static_compiled`: the uncompiled model with HF `StaticCache` + `torch.compile(mode="reduce-overhead")`,
  what users have today.
For contexts x batches it reports the decode step eager and captured in a CUDA graph (static cache), tokens/s, the
bytes a step must read (weights + full layers' caches + selected blocks + rings) and the achieved bandwidth against
the copy bandwidth measured in the same run; that the cache's bytes equal `plan_kv`; the largest context (batch 1)
and batch (32k) whose cache fits, found by allocating; and prefill time at 32k (time to first token).

    python -m bench.bench_decode                    # the GPU run (about 6-8 minutes on an H100/H200)
    python -m bench.bench_decode --tiny             # CPU smoke test of every code path at toy sizes
    python -m bench.bench_decode --contexts 131072 --batches 8 --budget-s 0 --skip-memory --inductor none \
        --writes both                               # the 128k row with the fused cache writes, then the scatters

Writes `$OUT/bench_decode.json` (or bench/results/) and prints markdown tables.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch


import hysparse_compile as hs
from .baselines import copy_bandwidth
from .timer import time_ms
from hysparse_compile.kv_plan import storage
from hysparse_compile.runtime import HySparseCache, layers

GiB = 2**30


def build_llama(tiny: bool, device, dtype):
    import transformers as tf

    if tiny:
        cfg = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=8, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=256)
    else:
        cfg = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=8, num_attention_heads=32,
                   num_key_value_heads=8, vocab_size=32000)
    config = tf.LlamaConfig(**cfg, max_position_embeddings=1 << 23, attn_implementation="sdpa",
                            tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = tf.LlamaForCausalLM(config).to(dtype).eval()
    return model


def schedule(tiny: bool, pattern: str | None = None):
    opts = dict(block_size=16, topk=64, window=32) if tiny else dict(block_size=64, topk=1024, window=128)
    return hs.Schedule.from_pattern(pattern, **opts) if pattern else hs.Schedule.hybrid(8, 3, **opts)


def fill_cache(model, B: int, ctx: int, margin: int) -> HySparseCache:
    """A static cache holding `ctx` random tokens per row (random K/V make selections random: the hard case)."""
    cache = HySparseCache(model, batch_size=B, max_cache_len=ctx + margin)
    for k, v in zip(cache.keys, cache.values):
        if k is not None:
            k.normal_()
            v.normal_()
    cache.lengths.fill_(ctx)
    cache.seen = ctx
    return cache


def weight_bytes_read(model, B: int) -> int:
    """Parameter bytes one decode step reads: every weight except the embedding table, of which B rows."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = model.get_input_embeddings().weight if hasattr(model, "get_input_embeddings") else None
    if emb is None:
        emb = next(m.weight for n, m in model.named_modules() if n.endswith("embed_tokens"))
    return total - emb.numel() * emb.element_size() + B * emb.shape[1] * emb.element_size()


def kv_bytes_read(model, B: int, ctx: int) -> int:
    """Cache bytes one decode step must read: full layers' whole caches, sparse layers' selected blocks (of the
    shared cache) and rings (or their own whole cache in the training-free / none modes)."""
    site = model.attention_sites[0]
    per_token = 2 * site.kv_heads * site.head_dim * 2 * B  # K and V, bf16
    total = 0
    for spec in model.schedule.layers:
        if storage(spec) == "full":  # the layers that keep their whole context (kv_plan's rule)
            total += per_token * ctx
        else:
            total += per_token * min(spec.topk, ctx)
            if spec.window is not None:
                total += per_token * min(spec.window, ctx)
    return total


def decode_row(name, model, B, ctx, device, timer, copy_gbs, tiny, inductor: bool = False) -> dict:
    """One decode step of `model` at (B, ctx), eager and in a CUDA graph. inductor: the compiled model's graph
    module goes through torch.compile first (its elementwise work fuses; the HySparse ops stay custom ops)."""
    if not inductor:
        return _decode_row(name, model, B, ctx, device, timer, copy_gbs, tiny)
    try:
        with model.graph_runner(torch.compile(model.graph_module, dynamic=False)):
            return _decode_row(name + "+inductor", model, B, ctx, device, timer, copy_gbs, tiny)
    finally:
        torch._dynamo.reset()


def _decode_row(name, model, B, ctx, device, timer, copy_gbs, tiny) -> dict:
    reps = 3 if tiny else 20
    margin = 4 * reps + 16
    cache = fill_cache(model, B, ctx, margin)
    plan_ok = cache.nbytes == cache.plan().total_bytes
    ids = torch.randint(0, model.config.vocab_size, (B, 1), device=device)
    pos = torch.full((B, 1), ctx, device=device, dtype=torch.long)
    mask = torch.ones(B, 1, dtype=torch.long, device=device)

    def step():
        return model(ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)

    with torch.no_grad():
        t0 = time.perf_counter()
        for _ in range(2):
            step()
        warm_s = time.perf_counter() - t0
        cache.lengths.fill_(ctx)
        eager = timer(step, reps)
        graph_ms = None
        if device.type == "cuda":
            cache.lengths.fill_(ctx)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                step()
            torch.cuda.current_stream().wait_stream(side)
            cache.lengths.fill_(ctx)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            cache.lengths.fill_(ctx)
            graph.replay()
            cache.lengths.fill_(ctx)
            graph_ms = timer(graph.replay, reps)
            del graph
    must = weight_bytes_read(model, B) + kv_bytes_read(model, B, ctx)
    best = graph_ms if graph_ms is not None else eager
    row = dict(model=name, batch=B, context=ctx, eager_ms=eager, graph_ms=graph_ms, tokens_per_s=B / (best * 1e-3),
               bytes_must_read=must, achieved_gbs=must / (best * 1e-3) / 1e9,
               frac_copy_bw=(must / (best * 1e-3) / 1e9) / copy_gbs if copy_gbs else None,
               cache_bytes=cache.nbytes, plan_bytes=cache.plan().total_bytes, cache_equals_plan=plan_ok,
               warmup_s=warm_s)
    del cache
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def hf_static_row(model, B, ctx, device, timer, copy_gbs, tiny) -> dict:
    """HF StaticCache + torch.compile(mode="reduce-overhead"), one decode step, cache full of random K/V."""
    import inspect as pyinspect

    import transformers as tf

    try:
        cache = tf.StaticCache(config=model.config, max_cache_len=ctx + 8)
    except TypeError:  # older transformers
        cache = tf.StaticCache(config=model.config, max_batch_size=B, max_cache_len=ctx + 8, device=device,
                               dtype=torch.bfloat16)
    name = "cache" if "cache" in pyinspect.signature(model.forward).parameters else "past_key_values"
    ids = torch.randint(0, model.config.vocab_size, (B, 1), device=device)
    with torch.no_grad():
        model(ids, **{name: cache}, use_cache=True, cache_position=torch.tensor([0], device=device))  # lazy init
        tensors = [t for layer in getattr(cache, "layers", []) for t in (layer.keys, layer.values)]
        tensors += list(getattr(cache, "key_cache", [])) + list(getattr(cache, "value_cache", []))
        for t in tensors:
            t.normal_()
        pos = torch.tensor([ctx], device=device)
        fwd = model.forward if tiny or device.type != "cuda" else torch.compile(model.forward, mode="reduce-overhead")

        def step():
            return fwd(input_ids=ids, **{name: cache}, use_cache=True, cache_position=pos,
                       position_ids=pos.expand(B, 1))

        t0 = time.perf_counter()
        for _ in range(3):
            step()
        warm_s = time.perf_counter() - t0
        ms = timer(step, 3 if tiny else 20)
    must = weight_bytes_read(model, B) + 2 * model.config.num_hidden_layers * B * ctx * \
        model.config.num_key_value_heads * (model.config.hidden_size // model.config.num_attention_heads) * 2
    row = dict(model="hf_static_compiled", batch=B, context=ctx, eager_ms=None, graph_ms=ms,
               tokens_per_s=B / (ms * 1e-3), bytes_must_read=must, achieved_gbs=must / (ms * 1e-3) / 1e9,
               frac_copy_bw=(must / (ms * 1e-3) / 1e9) / copy_gbs if copy_gbs else None, compile_s=warm_s)
    del cache, tensors
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def largest_fit(model, device, *, batch: int | None, context: int | None, lo: int, hi: int, cap: int) -> int:
    """The largest context (batch fixed) or batch (context fixed) whose static cache can be allocated next to the
    model, found by allocating (binary search between lo and hi), with 2 GiB left for a step's activations."""
    def fits(n: int) -> bool:
        try:
            cache = HySparseCache(model, batch_size=batch or n, max_cache_len=context or n)
            spare = torch.empty(2 * GiB, dtype=torch.uint8, device=device) if device.type == "cuda" else None
            del cache, spare
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    if not fits(lo):
        return 0
    while hi < cap and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, cap)
    while hi - lo > max(1, lo // 200):
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def prefill_row(name, model, T, device, timer, compiled: bool) -> dict:
    ids = torch.randint(0, model.config.vocab_size, (1, T), device=device)
    with torch.no_grad():
        def run():
            if compiled:
                return model(ids, use_cache=True, logits_to_keep=1)
            return model(input_ids=ids, use_cache=True, logits_to_keep=1)
        run()
        ms = timer(run, 3)
    return dict(model=name, context=T, prefill_ms=ms)


def table(rows, cols) -> str:
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append("" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test at toy sizes")
    ap.add_argument("--contexts", default=None, help="comma-separated contexts (default 32768,131072)")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--hf", default=None, help="contextxbatch shapes for the HF baseline (default all)")
    ap.add_argument("--budget-s", type=float, default=500.0, help="no new HF baseline / memory search after this")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--inductor", default=None, help="contextxbatch shapes to also run with the compiled model's "
                                                     "graph under torch.compile (default: the largest; none: no rows)")
    ap.add_argument("--writes", default="fused", choices=("fused", "scatter", "both"),
                    help="the cache writes of decode: one Triton launch per layer (fused, the runtime's default on "
                         "CUDA), two scatter_s per layer (scatter; rows named model[scatter]), or both in turn")
    args = ap.parse_args()
    t_start = time.perf_counter()
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    tiny = args.tiny or device.type == "cpu"
    dtype = torch.float32 if tiny else torch.bfloat16
    contexts = [int(x) for x in (args.contexts or ("200,300" if tiny else "32768,131072")).split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    out_dir = Path(os.environ.get("OUT") or Path(__file__).resolve().parent / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    def timer(fn, reps: int) -> float:  # the mean of `reps` back-to-back steps (events on CUDA)
        return time_ms(fn, device, reps=reps)

    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                device=torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
                torch=torch.__version__, python=platform.python_version(), command=" ".join(sys.argv))
    try:
        import transformers
        import triton

        meta.update(transformers=transformers.__version__, triton=triton.__version__)
    except Exception:
        pass
    meta["copy_gbs"] = copy_bandwidth(device) if device.type == "cuda" else None
    print(json.dumps(meta), flush=True)
    result = dict(meta=meta, decode=[], memory=[], prefill=[])

    def save():
        (out_dir / "bench_decode.json").write_text(json.dumps(result, indent=1))

    model = build_llama(tiny, device, dtype)
    t0 = time.perf_counter()
    hybrid = hs.compile(model, schedule(tiny))
    dense = hs.compile(model, schedule(tiny, "F" * 8))
    meta["compile_s"] = time.perf_counter() - t0
    print(f"compiled both in {meta['compile_s']:.1f}s; weights {weight_bytes_read(model, 1) / 1e9:.2f} GB read "
          f"per step (hybrid adds gates: {weight_bytes_read(hybrid, 1) / 1e9:.2f} GB)", flush=True)
    writes = ("fused", "scatter") if args.writes == "both" else (args.writes,)
    for ctx in contexts:
        for B in batches:
            for mode in writes:
                layers.FUSED_WRITES = "cuda" if mode == "fused" else "off"
                for name, m in (("hysparse", hybrid), ("dense_floor", dense)):
                    label = name if mode == "fused" else f"{name}[scatter]"
                    row = decode_row(label, m, B, ctx, device, timer, meta["copy_gbs"], tiny)
                    result["decode"].append(row)
                    print(json.dumps(row), flush=True)
                    save()
    layers.FUSED_WRITES = "cuda"
    if args.inductor == "none":
        inductor = []
    elif args.inductor:
        inductor = [tuple(int(v) for v in s.split("x")) for s in args.inductor.split(",")]
    else:
        inductor = [(max(contexts), max(batches))]
    for ctx, B in inductor:
        for name, m in (("hysparse", hybrid), ("dense_floor", dense)):
            try:
                row = decode_row(name, m, B, ctx, device, timer, meta["copy_gbs"], tiny, inductor=True)
            except Exception as e:  # recorded, not fatal
                row = dict(model=name + "+inductor", batch=B, context=ctx, error=f"{type(e).__name__}: {e}"[:300])
            result["decode"].append(row)
            print(json.dumps(row), flush=True)
            save()
    hf_shapes = ([tuple(int(v) for v in s.split("x")) for s in args.hf.split(",")] if args.hf
                 else [(c, b) for c in contexts for b in batches])
    for ctx, B in hf_shapes:
        if time.perf_counter() - t_start > args.budget_s:
            result["decode"].append(dict(model="hf_static_compiled", batch=B, context=ctx, skipped="time budget"))
            continue
        try:
            row = hf_static_row(model, B, ctx, device, timer, meta["copy_gbs"], tiny)
        except Exception as e:  # recorded, not fatal: the rest of the run still counts
            row = dict(model="hf_static_compiled", batch=B, context=ctx, error=f"{type(e).__name__}: {e}"[:300])
        result["decode"].append(row)
        print(json.dumps(row), flush=True)
        save()
    T = 512 if tiny else 32768
    for name, m, comp in (("hysparse", hybrid, True), ("original", model, False)):
        row = prefill_row(name, m, T, device, timer, comp)
        result["prefill"].append(row)
        print(json.dumps(row), flush=True)
    save()
    if not args.skip_memory and time.perf_counter() - t_start < args.budget_s + 60:
        ctx32 = 512 if tiny else 32768
        for name, m in (("dense_floor", dense), ("hysparse", hybrid)):
            lo_c, lo_b, cap = (1 << 16, 8, 1 << 40) if device.type == "cuda" else (256, 1, 4096)
            row = dict(model=name, max_context_batch1=largest_fit(m, device, batch=1, context=None, lo=lo_c,
                                                                  hi=4 * lo_c, cap=cap),
                       max_batch_context32k=largest_fit(m, device, batch=None, context=ctx32, lo=lo_b, hi=4 * lo_b,
                                                        cap=cap))
            result["memory"].append(row)
            print(json.dumps(row), flush=True)
            save()
    result["meta"]["total_s"] = time.perf_counter() - t_start
    save()
    print(table(result["decode"], ["model", "batch", "context", "eager_ms", "graph_ms", "tokens_per_s",
                                   "bytes_must_read", "achieved_gbs", "frac_copy_bw", "cache_equals_plan"]))
    print(table(result["prefill"], ["model", "context", "prefill_ms"]))
    print(table(result["memory"], ["model", "max_context_batch1", "max_batch_context32k"]))
    print(f"total {result['meta']['total_s']:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
