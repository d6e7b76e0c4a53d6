"""End to end on one GPU (issue 9 item 5): a compiled HF Llama against the same model uncompiled.

Model: `transformers.LlamaForCausalLM` at the paper's 7B attention shape — hidden 4096, Hq/Hkv/d = 32/8/128,
intermediate 11008 (Llama-2-7B's MLP), 8 layers, vocab 32000 — random weights, bf16, batch 1. The original runs
HF's `sdpa` attention (causal, no mask, `enable_gqa`; `--sdpa cudnn` puts cuDNN first, flash next: what the issue
measured); the compiled one is `hs.compile(model, Schedule.hybrid(8, 3), backend="triton")` (F S S S F S S F,
block 64, topk 1024, window 128, per-channel gates, sinks). Both share the weights and are called the same way:
`m(input_ids=ids)` with no mask (so no padding roll), the original with `use_cache=False`; the forward includes the
LM head and returns full logits for both.

Sections (each row = original and compiled; ratio = original time / compiled time = the compiled model's speedup):
- `best`     the fair forward (issue 22): the original at its best — `eager` (HF sdpa: mask dropped, causal,
             enable_gqa), `compile[layers]` (each decoder layer compiled, the mask made eagerly and dropped),
             `compile[causal]` (the whole model compiled with a registered attention function calling SDPA with
             is_causal and enable_gqa, no mask built; bench/original_best.py) — against the compiled model `eager`
             and `compile` (torch.compile(compiled)); each row the median of --calls calls with min and max; each
             original variant's logits against the eager original's at the first length; ratios against the
             original's fastest variant (`original_best`), the targets judged there;
- `best_fwdbwd` the same for forward + backward (loss = logits.sum()) at 8k and 32k;
- `fwd`      forward, eager, no grad, T = 8k, 16k, 32k, 128k (128k skipped with the reason when it cannot fit the
             budget or memory); peak memory of one call;
- `fwdbwd`   forward + backward, eager, T = 8k, 32k, loss = logits.sum() for both (grads of every weight; gates and
             sinks too on the compiled side); peak memory of one step from no grads (`max_memory_allocated`);
- `stack`    the attention alone: `Schedule.hybrid(36, 3)` (10 full + 26 sparse layers) at 32k, the HySparse ops
             called directly (`hysparse_compile.functional`, backend triton, real selections from each full layer,
             per-channel gates laid out as the compiled model makes them, sinks) against 36 x
             `F.scaled_dot_product_attention` (cuDNN, GQA), no projections, forward;
- `compile`  forward under `torch.compile` (dynamic shapes, one compile per model): the original, and the compiled
             model (first the whole module; if that raises, its graph module alone, as bench_decode does); a failure
             is recorded in the row, never fatal; the first call's time is `compile_s`.
- `compile_fwdbwd`  fwd+bwd under `torch.compile` at 8k and 32k, both models, with peak memory.
For the two `compile` sections the ratio table also gives `vs_fastest_original` (the faster of the original's eager
and compiled runs ÷ the compiled model's compiled run), which is what the targets are judged on there: on the H200
`torch.compile` made the original *slower* at 32k.
Targets (issue 9): forward >= 1.0x at 8k, >= 1.15x at 32k, >= 1.5x at 128k; fwd+bwd >= 1.0x at 8k, >= 1.1x at
32k; peak memory within 5% of the original's; stack: moonshot >= 3x.

    python -m bench.bench_e2e --sections best --seqlens 8k,32k,128k      # the fair forward rows
    python -m bench.bench_e2e --sections best_fwdbwd                     # the fair fwd+bwd rows (8k, 32k)
    python -m bench.bench_e2e                        # GPU, all sections, stops starting rows after --budget-s
    python -m bench.bench_e2e --quick                # 8k and 32k only, shorter timing
    python -m bench.bench_e2e --sections compile     # one section (e.g. in a second device call)
    python -m bench.bench_e2e --profile 32768        # also: top CUDA kernels of one forward of each model at 32k
    python -m bench.bench_e2e --sections best --selections tile   # sparse layers on injected tile-correlated
                                                     # selections (bench/inject.py; or random, or a selections.npz)
    python -m bench.bench_e2e --smoke                # CPU, float32, tiny 4-layer model (F S S F), T = 64..192,
                                                     # reference backend, torch.compile backend "eager"

Timing: `bench.timer.time_ms` (`triton.testing.do_bench`, median, L2 flushed; a perf_counter loop on CPU). Outputs:
a table on stdout, `bench_e2e.json` in `--out` (default $OUT or bench/results/), rewritten after every row.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch


import hysparse_compile as hs
from . import kernel_options, original_best
from .baselines import Rotor, sdpa_call
from .inject import KINDS, injected_selections
from .timer import samples_ms, time_ms

GiB = 2**30
DEFAULT_LABELS = ("8k", "16k", "32k", "128k")
LABELS = ("4k",) + DEFAULT_LABELS  # 4k only when named: the length of the paper miniature's selections.npz
SEQLENS = {"4k": 4096, "8k": 8192, "16k": 16384, "32k": 32768, "128k": 131072}
SMOKE_SEQLENS = {"4k": 48, "8k": 64, "16k": 96, "32k": 128, "128k": 192}
FWD_TARGETS = {"8k": 1.0, "32k": 1.15, "128k": 1.5}
FWDBWD_TARGETS = {"8k": 1.0, "32k": 1.1}
MEMORY_TOLERANCE = 1.05  # compiled peak / original peak
STACK_MOONSHOT = 3.0
SECTIONS = ("best", "best_fwdbwd", "fwd", "fwdbwd", "stack", "compile", "compile_fwdbwd")
BEST = ("best", "best_fwdbwd")  # the sections judged against the original at its best


# ---------------------------------------------------------------------------------------------- setup
def model_config(smoke: bool) -> dict:
    if smoke:
        return dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=256)
    return dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=8, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=32000)


def schedule_options(smoke: bool, gate: str = "element", topk: int | None = None) -> dict:
    sizes = dict(block_size=16, topk=32, window=16) if smoke else {}  # GPU: the defaults (64, 1024, 128)
    if topk is not None:
        sizes["topk"] = topk
    return {**sizes, "gate": gate}


RATIO = 3  # sparse layers per full layer in every schedule here (the paper's 1:3)


def make_schedule(smoke: bool, gate: str = "element", topk: int | None = None):
    """The compiled model's schedule: hybrid(layers, RATIO), 8 layers (F S S S F S S F), 4 in --smoke (F S S F)."""
    return hs.Schedule.hybrid(model_config(smoke)["num_hidden_layers"], RATIO,
                              **schedule_options(smoke, gate, topk))


def describe(schedule) -> str:
    """'hybrid(8, 3) block 64, topk 1024, window 128'"""
    return (f"hybrid({len(schedule.pattern)}, {RATIO}) block {schedule.block_size}, topk {schedule.topk}, "
            f"window {schedule.window}")


def build(smoke: bool, device, dtype, backend: str, save_branches: bool = False, gate: str = "element",
          topk: int | None = None):
    import transformers as tf

    config = tf.LlamaConfig(**model_config(smoke), max_position_embeddings=1 << 18, attn_implementation="sdpa",
                            tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = tf.LlamaForCausalLM(config).to(dtype).eval()
    t0 = time.perf_counter()
    compiled = hs.compile(model, make_schedule(smoke, gate, topk), backend=backend, save_branches=save_branches)
    return model, compiled, time.perf_counter() - t0


@contextlib.contextmanager
def sdpa_backends(name: str):
    """The SDPA backends the original may use: "default" (torch's own order) or "cudnn" (cuDNN first, then flash,
    efficient, math: the base the issue measured), "flash" (flash first)."""
    if name == "default":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    first = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[name]
    order = [first] + [b for b in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                                   SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH) if b != first]
    try:
        ctx = sdpa_kernel(order, set_priority=True)
    except TypeError:  # older torch: no priority, the set alone
        ctx = sdpa_kernel(order)
    with ctx:
        yield


def sdpa_probe(device, dtype, cfg: dict, name: str) -> str:
    """Which backend SDPA can use for the model's attention call (GQA, causal) when only `name` is allowed."""
    if device.type != "cuda" or name == "default":
        return "torch default order"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    hq, hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg["hidden_size"] // hq
    q = torch.randn(1, hq, 1024, d, device=device, dtype=dtype)
    k = torch.randn(1, hkv, 1024, d, device=device, dtype=dtype)
    backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[name]
    try:
        with sdpa_kernel(backend):
            torch.nn.functional.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=True)
        return f"{name} runs the model's GQA call"
    except RuntimeError as e:
        return f"{name} cannot run the GQA call ({str(e).splitlines()[0][:120]}); the next backend in order runs it"


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def peak_of(fn, device) -> tuple[float | None, float | None]:
    """(peak GiB allocated during one call, peak GiB above what was allocated before it); None on CPU."""
    if device.type != "cuda":
        fn()
        return None, None
    free_memory(device)
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return peak / GiB, (peak - base) / GiB


class Bench:
    def __init__(self, args):
        self.args = args
        self.smoke = args.smoke
        self.device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
        self.dtype = torch.float32 if self.smoke else torch.bfloat16
        self.backend = args.backend or ("reference" if self.smoke else "triton")
        self.seqlens = SMOKE_SEQLENS if self.smoke else SEQLENS
        self.t_start = time.perf_counter()
        self.out_dir = Path(args.out or os.environ.get("OUT") or Path(__file__).resolve().parent / "results")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = []
        self.fwd_ms: dict = {}  # (label, model) -> eager forward ms, for the 128k estimates
        self.meta: dict = {}
        if args.quick:
            self.warmup_ms, self.rep_ms = 10, 40
        elif self.smoke:
            self.warmup_ms, self.rep_ms = 1, 1  # two timed calls
        else:
            self.warmup_ms, self.rep_ms = 25, 100

    # ------------------------------------------------------------------ bookkeeping
    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def over_budget(self) -> bool:
        return self.elapsed() > self.args.budget_s

    def log(self, msg: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {msg}", flush=True)

    def save(self) -> None:
        result = dict(meta=self.meta, rows=self.rows, ratios=ratios(self.rows))
        (self.out_dir / "bench_e2e.json").write_text(json.dumps(result, indent=1))

    def add(self, row: dict) -> dict:
        self.rows.append(row)
        shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if k != "traceback"}
        self.log(json.dumps(shown))
        self.save()
        return row

    def skip(self, section: str, label: str, model: str, mode: str, why: str) -> dict:
        return self.add(dict(section=section, label=label, T=self.seqlens.get(label), model=model, mode=mode,
                             skipped=why))

    def skip_both(self, section: str, label: str, why: str) -> None:
        """The original's and the compiled model's eager rows of `section`/`label`, skipped for `why`."""
        for model in ("original", "compiled"):
            self.skip(section, label, model, "eager", why)

    def time(self, fn, grad_to_none=None) -> float:
        return time_ms(fn, self.device, grad_to_none=grad_to_none, warmup_ms=self.warmup_ms, rep_ms=self.rep_ms)

    def run_row(self, section, label, model_name, mode, body) -> dict:
        """body() -> dict of measurements; errors (OOM included) are recorded in the row."""
        T = self.seqlens[label] if label in self.seqlens else None
        row = dict(section=section, label=label, T=T, model=model_name, mode=mode)
        try:
            row.update(body())
        except Exception as e:  # recorded, not fatal
            row["error"] = f"{type(e).__name__}: {e}"[:400]
            if os.environ.get("BENCH_TRACEBACK"):
                row["traceback"] = traceback.format_exc()
        free_memory(self.device)
        return self.add(row)

    def ids(self, T: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(T)
        return torch.randint(0, model_config(self.smoke)["vocab_size"], (1, T), generator=g).to(self.device)


# ---------------------------------------------------------------------------------------------- model calls
def call_original(model, ids, sdpa: str):
    with sdpa_backends(sdpa):
        return model(input_ids=ids, use_cache=False).logits


def call_compiled(compiled, ids, sdpa: str = "default"):
    return compiled(input_ids=ids).logits


def fwd_body(b: Bench, fn, T: int):
    ids = b.ids(T)

    def run():
        with torch.no_grad():
            fn(ids)

    t0 = time.perf_counter()
    run()  # first call: kernels compile / autotune here, not in the timer
    if b.device.type == "cuda":
        torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    ms = b.time(run)
    peak, act = peak_of(run, b.device)
    return dict(ms=ms, first_call_s=first_s, peak_gib=peak, peak_above_start_gib=act)


def fwdbwd_body(b: Bench, fn, T: int, params):
    ids = b.ids(T)

    def run():
        fn(ids).sum().backward()

    for p in params:
        p.grad = None
    run()
    for p in params:
        p.grad = None
    ms = b.time(run, grad_to_none=params)
    for p in params:
        p.grad = None
    peak, act = peak_of(run, b.device)
    for p in params:
        p.grad = None
    return dict(ms=ms, peak_gib=peak, peak_above_start_gib=act)


# ---------------------------------------------------------------------------------------------- the fair sections
def spread(ms: list[float]) -> dict:
    ms = sorted(ms)
    return dict(ms=ms[len(ms) // 2] if len(ms) % 2 else (ms[len(ms) // 2 - 1] + ms[len(ms) // 2]) / 2,
                ms_min=ms[0], ms_max=ms[-1], calls=len(ms))


def compiled_variants(b: Bench, compiled, stack: contextlib.ExitStack) -> dict:
    """The compiled model eager and under torch.compile (the whole module; if that fails on first use, its graph
    module alone, the HySparse ops staying custom ops; `stack` holds that fallback until the section ends)."""
    backend = b.args.compile_backend or ("eager" if b.smoke else "inductor")
    state = {"fn": torch.compile(compiled, dynamic=True, backend=backend), "how": "torch.compile(compiled)"}

    def compiled_compile(ids):
        try:
            return call_compiled(state["fn"], ids)
        except Exception as e:
            if state["how"] != "torch.compile(compiled)":
                raise
            b.log(f"torch.compile(compiled) failed ({type(e).__name__}: {str(e)[:160]}); its graph module alone")
            stack.enter_context(compiled.graph_runner(torch.compile(compiled.graph_module, dynamic=True,
                                                                    backend=backend)))
            state.update(fn=compiled, how="torch.compile(compiled.graph_module)")
            return call_compiled(compiled, ids)

    return {"eager": lambda ids: call_compiled(compiled, ids), "compile": compiled_compile}, state


def section_best(b: Bench, model, compiled, labels, backward: bool = False):
    """Every variant of the original (eager; compiled per layer; compiled whole with causal SDPA kept) and of the
    compiled model (eager; torch.compile), median of --calls calls with the spread; each original variant's logits
    against the eager original's at the first length (up to 32k). Ratios are taken against the original's fastest
    variant."""
    section = "best_fwdbwd" if backward else "best"
    backend = b.args.compile_backend or ("eager" if b.smoke else "inductor")
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    orig = original_best.variants(model, lambda m, ids: call_original(m, ids, b.args.sdpa), backend=backend)
    stack = contextlib.ExitStack()
    comp, comp_state = compiled_variants(b, compiled, stack)
    params = {"original": [p for p in model.parameters() if p.requires_grad],
              "compiled": [p for p in compiled.parameters() if p.requires_grad]}
    reference = {}
    try:
        for i, label in enumerate(labels):
            T = b.seqlens[label]
            per_call = {"original": len(orig) * (b.args.calls + 1), "compiled": len(comp) * (b.args.calls + 1)}
            why = long_row_blocker(b, b.fwd_ms, per_call) if label == "128k" and not b.smoke else None
            for name, table in (("original", orig), ("compiled", comp)):
                for mode, fn in table.items():
                    if b.over_budget() or why:
                        b.skip(section, label, name, mode, why or "time budget")
                        continue
                    b.log(f"{section} {label} (T={T}): {name} {mode}")
                    # the logits check holds the eager logits ([T, vocab]) beside each variant's: at 128k that
                    # alone ran the compiled originals out of memory (call j of 2026-12-05), so not past 32k
                    check = i == 0 and name == "original" and not backward and T <= 32768
                    b.run_row(section, label, name, mode,
                              lambda: best_body(b, fn, T, params[name] if backward else None,
                                                reference if check else None, mode)
                              | ({"how": comp_state["how"]} if name == "compiled" and mode == "compile" else {}))
            reference.clear()
            for name in ("original", "compiled"):  # the fastest forward of each model, for the 128k estimate
                ms = [r["ms"] for r in b.rows if (r["section"], r["label"], r["model"]) == (section, label, name)
                      and r.get("ms")]
                if ms and not backward:
                    b.fwd_ms[(label, name)] = min(ms)
    finally:
        stack.close()
        torch._dynamo.reset()


def best_body(b: Bench, fn, T: int, params, reference, mode: str):
    ids = b.ids(T)
    out = {}
    if params is None:
        def run():
            with torch.no_grad():
                return fn(ids)
    else:
        def run():
            fn(ids).sum().backward()
            for p in params:
                p.grad = None
    t0 = time.perf_counter()
    first = run()
    if b.device.type == "cuda":
        torch.cuda.synchronize()
    out["first_call_s"] = time.perf_counter() - t0
    if reference is not None:  # logits of this variant against the eager original's, same ids
        if mode == "eager":
            reference["logits"] = first
        elif "logits" in reference:
            want = reference["logits"].float()
            got = first.float()
            out["logits_max_abs_vs_eager"] = (got - want).abs().max().item()
            out["logits_rel_vs_eager"] = out["logits_max_abs_vs_eager"] / want.abs().max().item()
            out["argmax_agree_vs_eager"] = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    del first
    out.update(spread(samples_ms(run, b.device, n=b.args.calls)))
    out["peak_gib"], out["peak_above_start_gib"] = peak_of(run, b.device)
    return out


# ---------------------------------------------------------------------------------------------- sections
def section_fwd(b: Bench, model, compiled, labels):
    done = {}
    for label in labels:
        T = b.seqlens[label]
        if b.over_budget():
            b.skip_both("fwd", label, "time budget")
            continue
        if label == "128k" and not b.smoke:
            why = long_row_blocker(b, done)
            if why:
                b.skip_both("fwd", label, why)
                continue
        b.log(f"fwd {label} (T={T}): original, then compiled")
        for name, fn in (("original", lambda ids: call_original(model, ids, b.args.sdpa)),
                         ("compiled", lambda ids: call_compiled(compiled, ids))):
            row = b.run_row("fwd", label, name, "eager", lambda: fwd_body(b, fn, T))
            done[(label, name)] = row.get("ms")
    b.fwd_ms = done


def long_row_blocker(b: Bench, done: dict, calls: dict | None = None) -> str | None:
    """Why the 128k forward rows cannot run here (None: they can). The time estimate scales each model's 32k
    forward (attention grows 16x, the rest 4x; taken as 10x) by the calls its 128k rows make: `calls[model]`, all
    rows of that model together (default 8, the timer's least per row; the fair sections pass rows x (calls + 1))."""
    calls = calls or {"original": 8, "compiled": 8}
    t32 = {n: done.get(("32k", n)) for n in ("original", "compiled")}
    left = b.args.budget_s - b.elapsed()
    if all(t is not None for t in t32.values()):
        need = sum(calls[n] * 10 * t for n, t in t32.items()) / 1e3
        if need > left:
            return f"time budget: ~{need:.0f}s needed (estimated from 32k), {left:.0f}s left"
    if b.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info()
        cfg = model_config(False)
        need = 131072 * (cfg["vocab_size"] * 2 + cfg["intermediate_size"] * 2 * 3 + cfg["hidden_size"] * 4 * 6)
        if need > free:
            return f"memory: ~{need / GiB:.0f} GiB of activations estimated, {free / GiB:.0f} GiB free"
    return None


def section_fwdbwd(b: Bench, model, compiled, labels, section: str = "fwdbwd", mode: str = "eager",
                   wrap=lambda m: m):
    """fwd+bwd rows of both models at `labels`; `wrap` is applied to each model first (torch.compile for the
    `compile_fwdbwd` section)."""
    models = {"original": wrap(model), "compiled": wrap(compiled)}
    params = {"original": [p for p in model.parameters() if p.requires_grad],
              "compiled": [p for p in compiled.parameters() if p.requires_grad]}
    calls = {"original": lambda ids: call_original(models["original"], ids, b.args.sdpa),
             "compiled": lambda ids: call_compiled(models["compiled"], ids)}
    for label in labels:
        T = b.seqlens[label]
        if b.over_budget():
            b.skip_both(section, label, "time budget")
            continue
        b.log(f"{'' if mode == 'eager' else mode + ' '}fwd+bwd {label} (T={T}): original, then compiled")
        for name in ("original", "compiled"):
            b.run_row(section, label, name, mode, lambda: fwdbwd_body(b, calls[name], T, params[name]))


def stack_inputs(b: Bench, T: int, sets: int = 2):
    cfg = model_config(b.smoke)
    hq, hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg["hidden_size"] // hq
    g = torch.Generator(device=b.device).manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, device=b.device, dtype=b.dtype, generator=g)

    out = []
    for _ in range(sets):
        q = rnd(1, T, hq, d).transpose(1, 2)  # [B, Hq, T, d] laid out as the projections make it
        k, v = rnd(1, T, hkv, d).transpose(1, 2), rnd(1, T, hkv, d).transpose(1, 2)
        gates = torch.sigmoid(rnd(1, T, 2, hq, d)).permute(2, 0, 3, 1, 4).unbind(0)  # as graph_ops.branch_gates
        out.append((q, k, v, gates))
    return out, hq


def section_stack(b: Bench):
    from hysparse_compile import functional as F

    label = "32k"
    T = b.seqlens[label]
    note = ("HySparse ops called directly (hysparse_compile.functional, backend=%s; real selections, per-channel "
            "gates, sinks; no projections) vs 36 x F.scaled_dot_product_attention (%s, GQA)" %
            (b.backend, "math" if b.smoke else "cudnn"))
    if b.over_budget():
        b.skip_both("stack", label, "time budget")
        return
    b.log(f"stack hybrid(36, {RATIO}) attention only at {label} (T={T}): {note}")
    schedule = hs.Schedule.hybrid(36, RATIO, **schedule_options(b.smoke))

    def dense_body():
        sets, _ = stack_inputs(b, T)
        rotor = Rotor([(q, k, v, None) for q, k, v, _ in sets])
        fn, _ = sdpa_call("math" if b.smoke else "cudnn", rotor, backward=False)

        def run():
            with torch.no_grad():
                for _ in range(len(schedule.layers)):
                    fn()
        run()
        return dict(ms=b.time(run), layers=len(schedule.layers), note=note + (f"; {rotor.note}" if rotor.note else ""))

    def hysparse_body():
        sets, hq = stack_inputs(b, T)
        sinks = torch.zeros(hq, device=b.device, dtype=b.dtype)
        rotor = Rotor(sets)

        def run():
            with torch.no_grad():
                shared = None
                for spec in schedule.layers:
                    q, k, v, (gs, gw) = rotor.next()
                    if spec.role == "full":
                        _, idx = F.full_attention(q, k, v, block_size=spec.block_size, topk=spec.topk,
                                                  backend=b.backend)
                        shared = (k, v, idx)
                    else:
                        F.sparse_attention(q, k, v, *shared, block_size=spec.block_size, window=spec.window,
                                           gate_sparse=gs, gate_swa=gw, sinks=sinks, backend=b.backend)
        run()
        return dict(ms=b.time(run), layers=len(schedule.layers), pattern=schedule.pattern, note=note)

    b.run_row("stack", label, "original", "eager", dense_body)
    b.run_row("stack", label, "compiled", "eager", hysparse_body)


def section_compile(b: Bench, model, compiled, labels):
    backend = b.args.compile_backend or ("eager" if b.smoke else "inductor")
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 32)
    orig_c = torch.compile(model, dynamic=True, backend=backend)
    variants = {"original": lambda ids: call_original(orig_c, ids, b.args.sdpa)}
    comp_state = {"how": "torch.compile(compiled)", "fn": torch.compile(compiled, dynamic=True, backend=backend)}

    def compiled_call(ids):
        return call_compiled(comp_state["fn"], ids)

    variants["compiled"] = compiled_call
    try:
        with contextlib.ExitStack() as stack:  # holds the graph-alone fallback, if it is taken
            _compile_rows(b, labels, backend, variants, comp_state, compiled, stack)
    finally:
        torch._dynamo.reset()


def section_compile_fwdbwd(b: Bench, model, compiled, labels):
    """fwd+bwd under torch.compile, both models compiled the same way (peak memory too)."""
    backend = b.args.compile_backend or ("eager" if b.smoke else "inductor")
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 32)
    try:
        section_fwdbwd(b, model, compiled, labels, "compile_fwdbwd", f"torch.compile[{backend}]",
                       lambda m: torch.compile(m, dynamic=True, backend=backend))
    finally:
        torch._dynamo.reset()


def _compile_rows(b, labels, backend, variants, comp_state, compiled, stack):
    for label in labels:
        T = b.seqlens[label]
        why = long_row_blocker(b, b.fwd_ms) if label == "128k" and not b.smoke else None
        for name in ("original", "compiled"):
            if b.over_budget() or why:
                b.skip("compile", label, name, f"torch.compile[{backend}]", why or "time budget")
                continue
            b.log(f"torch.compile[{backend}] fwd {label} (T={T}): {name}")
            row = b.run_row("compile", label, name, f"torch.compile[{backend}]",
                            lambda: fwd_body(b, variants[name], T) | ({"how": comp_state["how"]}
                                                                      if name == "compiled" else {}))
            if name == "compiled" and "error" in row and comp_state["how"] == "torch.compile(compiled)":
                # the whole module did not compile: its graph module alone (HySparse ops stay custom ops)
                b.log(f"torch.compile(compiled) failed ({row['error'][:160]}); trying its graph module alone")
                torch._dynamo.reset()
                stack.enter_context(compiled.graph_runner(torch.compile(compiled.graph_module, dynamic=True,
                                                                        backend=backend)))
                comp_state.update(how="torch.compile(compiled.graph_module)", fn=compiled,
                                  whole_module_error=row["error"])
                row2 = b.run_row("compile", label, name, f"torch.compile[{backend}]",
                                 lambda: fwd_body(b, variants[name], T) | {"how": comp_state["how"],
                                                                           "whole_module_error": row["error"]})
                row["superseded"] = True
                if "error" in row2:
                    comp_state["failed"] = True


def section_profile(b: Bench, model, compiled, T: int, rows: int = 20, backward: bool = False) -> dict:
    """Top kernels by self device time for one forward (backward: one forward + backward) of each model, after a
    warm-up call."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if b.device.type == "cuda" else [])
    ids = b.ids(T)
    tables = {}
    what = "forward+backward" if backward else "forward"
    for name, call in (("compiled", lambda: call_compiled(compiled, ids)),
                       ("original", lambda: call_original(model, ids, b.args.sdpa))):
        params = list((compiled if name == "compiled" else model).parameters())

        def fn():
            if backward:
                call().sum().backward()
                for p in params:
                    p.grad = None
            else:
                call()

        with torch.set_grad_enabled(backward):
            fn()
            with profile(activities=acts) as prof:
                fn()
                if b.device.type == "cuda":
                    torch.cuda.synchronize()
        events = prof.key_averages()
        text = None
        keys = ("self_cuda_time_total", "self_device_time_total") if b.device.type == "cuda" else ()
        for key in keys + ("self_cpu_time_total",):
            try:
                text = events.table(sort_by=key, row_limit=rows, max_name_column_width=90)
                break
            except Exception:
                continue
        tables[name] = text
        print(f"\n=== profile: {name} {what}, T={T} (top {rows} by self device time) ===\n{text}", flush=True)
        (b.out_dir / f"bench_e2e_profile_{name}_{'fwdbwd_' if backward else ''}{T}.txt").write_text(text or "")
        free_memory(b.device)
    return tables


# ---------------------------------------------------------------------------------------------- ratios, table
def best_ratios(rows: list[dict]) -> list[dict]:
    """The fair sections: per (section, label), the original's fastest variant against each variant of the
    compiled model."""
    out = []
    for section in BEST:
        for label in LABELS:
            mine = [r for r in rows if r["section"] == section and r["label"] == label]
            orig = [r for r in mine if r["model"] == "original" and r.get("ms")]
            if not orig:
                continue
            best = min(orig, key=lambda r: r["ms"])
            targets = FWDBWD_TARGETS if section == "best_fwdbwd" else FWD_TARGETS
            for comp in (r for r in mine if r["model"] == "compiled"):
                entry = dict(section=section, label=label, mode=comp["mode"], T=best.get("T"),
                             original_best=best["mode"], original_ms=best["ms"], compiled_ms=comp.get("ms"))
                if comp.get("ms"):
                    entry["speedup"] = best["ms"] / comp["ms"]
                    entry["speedup_range"] = (best["ms_min"] / comp["ms_max"], best["ms_max"] / comp["ms_min"])
                else:
                    entry["missing"] = comp.get("error") or comp.get("skipped")
                if label in targets:
                    entry["target"] = targets[label]
                    if "speedup" in entry:
                        entry["met"] = entry["speedup"] >= entry["target"]
                if comp.get("peak_gib") and best.get("peak_gib"):
                    entry["memory_ratio"] = comp["peak_gib"] / best["peak_gib"]
                out.append(entry)
    return out


def ratios(rows: list[dict]) -> list[dict]:
    """original time / compiled time per (section, label, mode); memory ratio compiled / original peak."""
    best = best_ratios(rows)
    rows = [r for r in rows if r["section"] not in BEST]
    index = {(r["section"], r["label"], r["mode"], r["model"]): r for r in rows if not r.get("superseded")}
    out = []
    for (section, label, mode, model), orig in index.items():
        if model != "original":
            continue
        comp = index.get((section, label, mode, "compiled"))
        if comp is None:
            continue
        entry = dict(section=section, label=label, mode=mode, T=orig.get("T"))
        if orig.get("ms") and comp.get("ms"):
            entry["speedup"] = orig["ms"] / comp["ms"]
        else:
            entry["missing"] = comp.get("error") or comp.get("skipped") or orig.get("error") or orig.get("skipped")
        targets = {"fwd": FWD_TARGETS, "fwdbwd": FWDBWD_TARGETS, "compile": FWD_TARGETS,
                   "compile_fwdbwd": FWDBWD_TARGETS}.get(section, {})
        if section == "stack":
            entry["moonshot"] = STACK_MOONSHOT
        elif label in targets:
            entry["target"] = targets[label]
        eager_twin = {"compile": "fwd", "compile_fwdbwd": "fwdbwd"}.get(section)
        eager_orig = index.get((eager_twin, label, "eager", "original")) if eager_twin else None
        if eager_orig and eager_orig.get("ms") and orig.get("ms") and comp.get("ms"):
            # torch.compile can make the original slower than its eager run: judge against the faster of the two
            entry["vs_fastest_original"] = min(orig["ms"], eager_orig["ms"]) / comp["ms"]
        judged = entry.get("vs_fastest_original", entry.get("speedup"))
        if judged is not None and "target" in entry:
            entry["met"] = judged >= entry["target"]
        if section in ("fwdbwd", "compile_fwdbwd") and orig.get("peak_gib") and comp.get("peak_gib"):
            entry["memory_ratio"] = comp["peak_gib"] / orig["peak_gib"]
            entry["memory_target"] = MEMORY_TOLERANCE
            entry["memory_met"] = entry["memory_ratio"] <= MEMORY_TOLERANCE
        out.append(entry)
    return best + out


def print_tables(rows: list[dict], meta: dict) -> None:
    try:
        from rich.console import Console
        from rich.markup import escape  # modes such as "compile[layers]" are not markup
        from rich.table import Table
    except ImportError:  # plain text
        Console = Table = None
    cols = ["section", "label", "T", "mode", "model", "ms", "ms_min", "ms_max", "peak_gib", "first_call_s",
            "logits_rel_vs_eager", "note"]
    ratio_cols = ["section", "label", "mode", "speedup", "original_best", "vs_fastest_original", "target", "met",
                  "memory_ratio", "memory_met"]

    def fmt(v):
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
        return str(v)

    def cell(r, c):
        if c == "ms" and r.get("ms") is None:
            return (r.get("error") or r.get("skipped") or "")[:70]
        if c == "note":
            return str(r.get("how") or "")
        return fmt(r.get(c))

    rat = ratios(rows)
    for r in rat:
        if "speedup" not in r:
            r["speedup_or_why"] = (r.get("missing") or "")[:60]
    if Console is None:
        print(" | ".join(cols))
        for r in rows:
            if not r.get("superseded"):
                print(" | ".join(cell(r, c) for c in cols))
        print(" | ".join(ratio_cols))
        for r in rat:
            print(" | ".join(fmt(r.get(c)) if c != "speedup" or "speedup" in r else r["speedup_or_why"]
                             for c in ratio_cols))
        return
    console = Console(width=200)
    t = Table(title=f"bench_e2e: {meta.get('model')} on {meta.get('device')}")
    for c in cols:
        t.add_column(c)
    for r in rows:
        if not r.get("superseded"):
            t.add_row(*(escape(cell(r, c)) for c in cols))
    console.print(t)
    t = Table(title="compiled vs original: speedup = original ms / compiled ms (targets from issue 9)")
    for c in ratio_cols:
        t.add_column(c)
    for r in rat:
        vals = [fmt(r.get(c)) for c in ratio_cols]
        if "speedup" not in r:
            vals[3] = r["speedup_or_why"]
        if "moonshot" in r:
            vals[5] = f"moonshot {r['moonshot']}"
        t.add_row(*map(escape, vals))
    console.print(t)
    if meta.get("stack_note"):
        console.print(f"stack: {meta['stack_note']}")


# ---------------------------------------------------------------------------------------------- main
def run_sections(b: Bench, args, sections, model, compiled, fwd_order, bwd_labels, labels) -> None:
    if "best" in sections:
        section_best(b, model, compiled, fwd_order)
    if "best_fwdbwd" in sections:
        section_best(b, model, compiled, bwd_labels, backward=True)
    if "fwd" in sections:
        section_fwd(b, model, compiled, fwd_order)
    if "fwdbwd" in sections:
        section_fwdbwd(b, model, compiled, bwd_labels)
    if "stack" in sections:
        section_stack(b)
    if "compile" in sections:
        section_compile(b, model, compiled, [label for label in ["8k", "32k", "16k", "128k"] if label in labels])
    if "compile_fwdbwd" in sections:
        section_compile_fwdbwd(b, model, compiled, bwd_labels)
    if args.profile:
        section_profile(b, model, compiled, args.profile)
    if args.profile_fwdbwd:
        section_profile(b, model, compiled, args.profile_fwdbwd, backward=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, float32, tiny model, reference backend")
    ap.add_argument("--quick", action="store_true", help="8k and 32k only, shorter timing loops")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    ap.add_argument("--seqlens", default=None, help="comma list of labels (8k,16k,32k,128k) for fwd and compile")
    ap.add_argument("--budget-s", type=float, default=220.0, help="no new row starts after this many seconds")
    ap.add_argument("--profile", type=int, default=None, metavar="T", help="print the top kernels of one forward "
                                                                          "of each model at length T")
    ap.add_argument("--profile-fwdbwd", type=int, default=None, metavar="T", help="the same for one forward + "
                                                                                  "backward")
    ap.add_argument("--save-branches", action="store_true", help="compile with save_branches=True (the sparse "
                    "layers keep both branch outputs for the backward instead of recomputing them)")
    ap.add_argument("--sdpa", default="cudnn", choices=("cudnn", "flash", "default"),
                    help="SDPA backend order of the original (default: cuDNN first, as the issue measured)")
    ap.add_argument("--backend", default=None, help="HySparse backend (default triton; reference in --smoke)")
    ap.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; eager in "
                                                            "--smoke)")
    ap.add_argument("--out", default=None, help="output directory (default $OUT or bench/results)")
    ap.add_argument("--calls", type=int, default=7, help="timed calls per row of the fair sections (median, spread)")
    ap.add_argument("--gate", default="element", choices=("element", "head", "none"),
                    help="the sparse layers' gates: element (the paper's per-channel gates, a [hidden, 2 * Hq * d] "
                         "projection per sparse layer; the default), head (one per head) or none: what the gates' "
                         "projection costs end to end")
    ap.add_argument("--topk", type=int, default=None, help="the schedule's top-k (default 1024; 512 for the paper "
                    "miniature's selections.npz, at --seqlens 4k)")
    ap.add_argument("--selections", default="model",
                    help="what the compiled model's sparse layers attend to: model (its full layers' own selections; "
                         "with random weights they are random-like), tile or random (drawn, bench/inject.py), or a "
                         "selections.npz of the paper miniature")
    ap.add_argument("--full-fwd", default=None, metavar="VARIANT",
                    help="run the full layers' forward as this variant of bench/full_fwd_variants.py (its tiles, "
                         "tensor-descriptor loads, accumulate form) instead of the kernel's FWD_CONFIG")
    kernel_options.add_token_tma_argument(ap)
    kernel_options.add_inductor_argument(ap)
    args = ap.parse_args(argv)
    kernel_options.inductor_config(args.inductor)
    try:
        kernel_options.apply(args.full_fwd, token_tma=args.token_tma)
    except ValueError as e:
        ap.error(str(e))
    if args.selections not in KINDS and not os.path.isfile(args.selections):
        ap.error(f"--selections {args.selections!r}: choose from {KINDS} or give a selections.npz that exists")
    b = Bench(args)
    if b.smoke:
        torch.set_num_threads(1)  # tiny ops: threads only contend (on a loaded 2-core machine, 100x slower)
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    labels = args.seqlens.split(",") if args.seqlens else (["8k", "32k"] if args.quick else list(DEFAULT_LABELS))
    if set(labels) - set(LABELS):
        ap.error(f"--seqlens {args.seqlens!r}: choose from {','.join(LABELS)}")
    fwd_order = sorted(labels, key=lambda l: ["8k", "32k", "128k", "16k", "4k"].index(l))  # the targets first
    bwd_labels = [label for label in ("8k", "32k") if label in labels or not args.seqlens]

    cfg = model_config(b.smoke)
    b.meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  device=torch.cuda.get_device_name() if b.device.type == "cuda" else platform.processor() or "cpu",
                  torch=torch.__version__, python=platform.python_version(), command=" ".join(sys.argv),
                  dtype=str(b.dtype).replace("torch.", ""), batch=1, backend=b.backend, sdpa=args.sdpa,
                  model=("LlamaForCausalLM hidden {hidden_size}, Hq/Hkv/d {num_attention_heads}/"
                         "{num_key_value_heads}/{d}, intermediate {intermediate_size}, {num_hidden_layers} layers, "
                         "vocab {vocab_size}").format(d=cfg["hidden_size"] // cfg["num_attention_heads"], **cfg),
                  schedule=describe(make_schedule(b.smoke, args.gate, args.topk)),
                  seqlens={k: v for k, v in b.seqlens.items()}, budget_s=args.budget_s,
                  targets=dict(fwd=FWD_TARGETS, fwdbwd=FWDBWD_TARGETS, memory=MEMORY_TOLERANCE,
                               stack_moonshot=STACK_MOONSHOT))
    for mod in ("transformers", "triton"):
        try:
            b.meta[mod] = __import__(mod).__version__
        except Exception:
            b.meta[mod] = None
    if b.device.type == "cuda":
        b.meta["cudnn"] = torch.backends.cudnn.version()
    b.meta["sdpa_probe"] = sdpa_probe(b.device, b.dtype, cfg, args.sdpa)
    b.log(json.dumps(b.meta))
    b.meta["save_branches"] = args.save_branches
    b.meta["selections"] = args.selections
    b.meta["gate"] = args.gate
    b.meta["full_fwd"] = args.full_fwd
    b.meta["inductor"] = args.inductor
    model, compiled, compile_s = build(b.smoke, b.device, b.dtype, b.backend, args.save_branches, args.gate,
                                       args.topk)
    b.meta["hs_compile_s"] = compile_s
    b.log(f"built and compiled ({compiled.schedule.pattern}) in {compile_s:.1f}s")
    b.save()
    with injected_selections(args.selections) as injected:
        run_sections(b, args, sections, model, compiled, fwd_order, bwd_labels, labels)
    b.meta["injected_calls"] = injected["calls"]
    b.meta["total_s"] = b.elapsed()
    b.save()
    print_tables(b.rows, b.meta)
    b.log(f"done; JSON in {b.out_dir / 'bench_e2e.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
