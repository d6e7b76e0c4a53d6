"""AOTInductor export on the GPU: build the CUDA package of a small compiled HF Llama (the Triton kernels compiled
into it as `triton_op`s), load it in a fresh Python process that never imports hysparse_compile, compare with the
eager compiled model, and time package vs eager vs torch.compile.

    python -m bench.check_export_gpu [--out DIR] [--layers 2] [--seq 4096]

Model: HF Llama, hidden 1024, 16 query / 4 KV heads (d = 64), `--layers` layers (default 2, pattern FS, FSSS...),
block 64, topk 512, window 128, bf16, random weights with the query/key projections scaled x8 (peaked attention,
so selections are decided by the weights rather than by bf16 rounding). Also a float32 package (the ops lower
through their ATen decompositions on CUDA too) against the eager float32 model, as an exactness check.

Checks (printed, and in `check_export_gpu.json` under --out):
- bf16 package (same Triton kernels as eager; Inductor fuses the rest differently) and eager bf16 model, each against
  the float32 model with the same weights (q/k unscaled for this check: `check_package`): rel L2 of the logits at
  (B, T) = (2, 77), (1, 1000), (1, --seq); ok when the package is no further from float32 than eager is (x1.5);
- fp32 package vs eager fp32: ok below 1e-4 (max |diff| / max |ref|);
- timing at (1, --seq), bf16: package (in the fresh process), eager compiled, torch.compile(compiled); median of
  10 after 3 warm-ups, CUDA-synchronized wall clock.
Every part runs in its own process with faulthandler on (`--parts`, default all: smoke, bf16-triton, bf16-aten,
fp32, decode-fp32, decode-bf16; `smoke` is a plain MLP's package: if it does not run, nothing else is tried), so a crash is reported with its stack and the other parts still run.
- decode packages (`to_aoti(..., decode=True)`), fp32 and bf16: a greedy loop of --new tokens after a left-padded
  prompt batch (2, 1000) in the fresh process against `compiled.generate` (fp32: tokens equal; bf16: the share of
  equal tokens, reported), and ms per decode step (package) against `compiled.generate`'s.
Each part runs on its own: a part that fails prints its traceback and the rest still runs (one device call gives
every answer). Expected well under 3 minutes on an H100 (most of it Inductor building the packages and
torch.compile).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback

import torch


import hysparse_compile as hs
from hysparse_compile.export import to_aoti
from hysparse_compile.export.aoti import compiler_finds, link_configs

from .timer import time_ms

VOCAB = 2048
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the fresh processes run from here (-m bench...)
RUNNER = textwrap.dedent("""
    import json, sys, torch
    from bench.timer import time_ms  # torch only: the package's process never imports hysparse_compile
    assert "hysparse_compile" not in sys.modules
    torch.zeros(1, device="cuda")  # CUDA initialized before the loader probes the device
    runner = torch._inductor.aoti_load_package(sys.argv[1])
    cases = torch.load(sys.argv[2])
    outs = []
    with torch.no_grad():  # the package takes input_ids, attention_mask (the compiled model's inputs, in order)
        for ids in cases:
            outs.append(runner(ids.cuda(), torch.ones_like(ids).cuda()).float().cpu())
        ids = cases[-1].cuda()
        mask = torch.ones_like(ids)
        package_ms = time_ms(lambda: runner(ids, mask), "cuda")
    torch.save(outs, sys.argv[3])
    assert "hysparse_compile" not in sys.modules
    print(json.dumps({"package_ms": package_ms}))
""")


DECODER = textwrap.dedent("""
    import json, sys, torch
    from bench.timer import time_ms
    assert "hysparse_compile" not in sys.modules
    torch.zeros(1, device="cuda")  # CUDA initialized before the loader probes the device
    prefill = torch._inductor.aoti_load_package(sys.argv[1])
    decode = torch._inductor.aoti_load_package(sys.argv[2])
    ids, mask, positions, new = torch.load(sys.argv[3])
    with torch.no_grad():
        outs = prefill(ids.cuda(), mask.cuda(), positions.cuda())
        tokens = []
        for i in range(new):
            tokens.append(outs[0][:, -1].argmax(-1, keepdim=True))
            outs = decode(tokens[-1], *outs[1:])
        step_ms = time_ms(lambda: decode(tokens[-1], *outs[1:]), "cuda")  # one more step, repeated
    torch.save(torch.cat(tokens, 1).cpu(), sys.argv[4])
    print(json.dumps({"step_ms": step_ms}))
""")


def build(layers: int, dtype: torch.dtype, qk_scale: float = 8.0):
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers,
                            num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=32768,
                            tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    model = tf.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(qk_scale)
            layer.self_attn.k_proj.weight.mul_(qk_scale)
    model = model.to("cuda", dtype)
    pattern = ("FSSS" * layers)[:layers]
    return hs.compile(model, hs.Schedule.from_pattern(pattern, block_size=64, topk=512, window=128))


def median_ms(fn, ids) -> float:
    with torch.no_grad():
        return time_ms(lambda: fn(ids), "cuda")


def logits(out):
    return out if isinstance(out, torch.Tensor) else out.logits


def rel_l2(x, ref) -> float:
    return float((x.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


def rel_max(x, ref) -> float:
    return float((x.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30))


def failure(run) -> str:
    """What a failed fresh process left: its exit code (negative = the signal) and the ends of both streams."""
    return (f"the fresh process ended with {run.returncode}\n--- stdout:\n{run.stdout[-2000:]}\n--- stderr:\n"
            f"{run.stderr[-4000:]}")


def fresh_process(package: str, cases: list, work: str) -> tuple[list, dict]:
    torch.save([c.cpu() for c in cases], os.path.join(work, "cases.pt"))
    out_path = os.path.join(work, "outs.pt")
    run = subprocess.run([sys.executable, "-X", "faulthandler", "-c", RUNNER, package, os.path.join(work, "cases.pt"),
                          out_path], capture_output=True, text=True, timeout=600, cwd=REPO)
    if run.returncode:
        raise RuntimeError(failure(run))
    return torch.load(out_path), json.loads(run.stdout.strip().splitlines()[-1])


def check_package(args, dtype, tol, cases, work, rows, kernels="triton"):
    """Build the package, run it in a fresh process, compare (rows appended).

    float32: against the eager compiled model, max |diff| / max |ref| below `tol`.
    bfloat16: both the package and the eager bf16 model against the float32 model with the same weights (rel L2),
    ok when the package is no further from it than the eager model is (x1.5 + 2e-3). bf16 models are built with
    unscaled q/k here: with the x8 peaking of the decode check, this model's own bf16 noise is 12% (T = 77) to 51%
    (T = 1000) rel L2 against float32 (measured on the CPU with the plain HF model), which hides any package error;
    unscaled it is 1.0-1.6%."""
    bf16 = dtype == torch.bfloat16
    compiled = build(args.layers, dtype, qk_scale=1.0 if bf16 else 8.0)
    t0 = time.perf_counter()
    package = os.path.join(work, f"llama_{str(dtype)[6:]}_{kernels}.pt2")
    result = to_aoti(compiled, cases[0].cuda(), package, kernels=kernels, check=False,
                     stage=lambda text: print(f"  [{time.perf_counter() - t0:5.1f} s] {text}", flush=True))
    build_s = time.perf_counter() - t0
    # the triton_ops are traced into their launches at capture: the graph holds Triton kernel calls, not our ops
    ours = {k: v for k, v in result.ops.items() if "hysparse" in k or "triton_kernel" in k}
    print(f"{dtype}: built {package} in {build_s:.1f} s, {result.size / 2**20:.1f} MiB, HySparse ops and Triton "
          f"kernel launches in the graph: {ours or 'none (ATen decompositions)'}; {result.check}", flush=True)
    outs, timing = fresh_process(package, cases, work)
    with torch.no_grad():
        eager = [logits(compiled(ids.cuda())).float().cpu() for ids in cases]
    refs32 = eager
    if bf16:
        model32 = build(args.layers, torch.float32, qk_scale=1.0)
        with torch.no_grad():
            refs32 = [logits(model32(ids.cuda())).float().cpu() for ids in cases]
        del model32
    for ids, got, ref, ref32 in zip(cases, outs, eager, refs32):
        row = {"dtype": str(dtype), "kernels": kernels, "shape": list(ids.shape), "package_ms": timing["package_ms"]}
        if bf16:
            row.update(metric="rel_l2 vs float32", package_err=rel_l2(got, ref32), eager_err=rel_l2(ref, ref32),
                       package_vs_eager=rel_l2(got, ref))
            row["ok"] = row["package_err"] <= 1.5 * row["eager_err"] + 2e-3 and bool(torch.isfinite(got).all())
            text = (f"rel L2 vs the float32 model: package {row['package_err']:.2e}, eager bf16 {row['eager_err']:.2e}"
                    f" (package vs eager {row['package_vs_eager']:.2e})")
        else:
            row.update(metric="max_rel", err=rel_max(got, ref))
            row["ok"] = row["err"] < tol and bool(torch.isfinite(got).all())
            text = f"max_rel {row['err']:.2e} (tol {tol:g})"
        rows.append(row)
        print(f"{'ok  ' if row['ok'] else 'FAIL'} {dtype} {kernels} package at {tuple(ids.shape)}: {text}", flush=True)
    return compiled, build_s


def time_it(compiled, ids, rows, build_s, kernels):
    """bf16 at (1, --seq): the package (timed in its fresh process), eager compiled, torch.compile(compiled)."""
    package_ms = rows[-1]["package_ms"]
    eager_ms = median_ms(lambda x: compiled(x), ids)
    if kernels != "triton":  # torch.compile is timed once, beside the Triton package
        rows.append({"timing": {"package_ms": package_ms, "eager_ms": eager_ms, "package_build_s": build_s},
                     "kernels": kernels, "shape": list(ids.shape)})
        print(f"time at {tuple(ids.shape)}, bf16, {kernels} package {package_ms:.2f} ms, eager {eager_ms:.2f} ms "
              f"(package build {build_s:.0f} s)", flush=True)
        return
    print(f"time at {tuple(ids.shape)}, bf16: package {package_ms:.2f} ms, eager {eager_ms:.2f} ms; torch.compile next",
          flush=True)
    t0 = time.perf_counter()
    try:
        fast = torch.compile(compiled)
        median_ms(lambda x: fast(x), ids, reps=1)  # compile
        compile_s = time.perf_counter() - t0
        compiled_ms = median_ms(lambda x: fast(x), ids)
    except Exception as e:  # reported, not fatal: the package is what this checks
        print(f"torch.compile(compiled) failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
        compile_s, compiled_ms = time.perf_counter() - t0, float("nan")
    rows.append({"timing": {"package_ms": package_ms, "eager_ms": eager_ms, "torch_compile_ms": compiled_ms,
                            "torch_compile_s": compile_s, "package_build_s": build_s}, "kernels": kernels,
                 "shape": list(ids.shape)})
    print(f"time at {tuple(ids.shape)}, bf16: package {package_ms:.2f} ms, eager {eager_ms:.2f} ms, torch.compile "
          f"{compiled_ms:.2f} ms (compile {compile_s:.0f} s, package build {build_s:.0f} s)", flush=True)


def check_decode(args, dtype, work, rows):
    """The prefill + decode-step packages in a fresh process: greedy tokens vs compiled.generate, ms per step."""
    compiled = build(args.layers, dtype)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, VOCAB, (2, 1000), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :37] = 0  # left padding in row 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    t0 = time.perf_counter()
    package = os.path.join(work, f"decode_{str(dtype)[6:]}.pt2")
    result = to_aoti(compiled, ids[:, :64].cuda(), package, decode=True, check=False,
                     stage=lambda text: print(f"  [{time.perf_counter() - t0:5.1f} s] {text}", flush=True))
    build_s = time.perf_counter() - t0
    print(f"{dtype}: built the decode packages in {build_s:.1f} s", flush=True)
    torch.save((ids, mask, positions, args.new), os.path.join(work, "decode_case.pt"))
    out = os.path.join(work, "decode_tokens.pt")
    run = subprocess.run([sys.executable, "-X", "faulthandler", "-c", DECODER, str(result.files[0]),
                          str(result.files[1]), os.path.join(work, "decode_case.pt"), out], capture_output=True,
                         text=True, timeout=600, cwd=REPO)
    if run.returncode:
        raise RuntimeError(failure(run))
    step_ms = json.loads(run.stdout.strip().splitlines()[-1])["step_ms"]
    got = torch.load(out)
    with torch.no_grad():
        compiled.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=4, do_sample=False)  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        want = compiled.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=args.new,
                                 do_sample=False)[:, ids.shape[1]:].cpu()
        torch.cuda.synchronize()
        generate_ms = (time.perf_counter() - t0) * 1e3 / args.new  # prefill included: an upper bound per step
    same = float((got == want).float().mean())
    ok = same == 1.0 if dtype == torch.float32 else same >= 0.5
    rows.append({"decode": str(dtype), "new": args.new, "same_tokens": same, "ok": ok, "package_step_ms": step_ms,
                 "generate_ms_per_token_incl_prefill": generate_ms, "build_s": build_s, "check": result.check})
    print(f"{'ok  ' if ok else 'FAIL'} {dtype} decode packages: {same:.0%} of {args.new} greedy tokens x 2 rows equal "
          f"compiled.generate's; package step {step_ms:.2f} ms, compiled.generate {generate_ms:.2f} ms/token "
          f"(prefill included)", flush=True)
    return ok


PARTS = ("smoke", "bf16-triton", "bf16-aten", "fp32", "decode-fp32", "decode-bf16")

def smoke(work, rows):
    """A two-layer MLP's CUDA package, no HySparse op anywhere, built with the configs to_aoti passes (the shared
    C++ runtime named for the link): does AOTInductor run CUDA packages here at all? Loaded in a fresh process
    (bench/diagnose_aoti.py's probe and loader)."""
    import diagnose_aoti as diag

    model, x = diag.mlp()
    configs = link_configs(None)
    print(f"smoke: compiler resolves libstdc++.so: {compiler_finds('libstdc++.so')}, libstdc++.so.6: "
          f"{compiler_finds('libstdc++.so.6')}; inductor_configs {configs}", flush=True)
    path = diag.package(model, x, "cuda", configs, os.path.join(work, "smoke.pt2"))
    x_path, ref_path = os.path.join(work, "x.pt"), os.path.join(work, "ref.pt")
    torch.save(x.cpu(), x_path)
    with torch.no_grad():
        torch.save(model(x.cuda()).cpu(), ref_path)
    result = diag.finish(diag.start(diag.LOAD, path, "cuda", x_path, ref_path, "0"))
    diag.show("smoke, fresh process", result)
    lines = [line for line in result["stdout"].splitlines() if line.startswith("ran, max |diff|")]
    err = float(lines[-1].split()[-1]) if lines else float("nan")
    rows.append({"smoke": True, "rc": result["rc"], "err": err, "ok": result["rc"] == 0 and err < 1e-4})


def run_part(part: str, args, cases, work) -> list:
    """One part of the check, in this process; its rows."""
    rows: list = []
    if part == "smoke":
        smoke(work, rows)
        return rows
    if part.startswith("decode-"):
        check_decode(args, torch.float32 if part.endswith("fp32") else torch.bfloat16, work, rows)
        return rows
    dtype, tol = (torch.float32, 1e-4) if part == "fp32" else (torch.bfloat16, 2e-2)
    kernels = "aten" if part in ("fp32", "bf16-aten") else "triton"
    compiled, build_s = check_package(args, dtype, tol, cases, work, rows, kernels)
    if dtype == torch.bfloat16:
        time_it(compiled, cases[-1].cuda(), rows, build_s, kernels)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--new", type=int, default=32, help="greedy tokens of the decode check")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    parser.add_argument("--part-timeout-s", type=int, default=240)
    parser.add_argument("--part", default=None, help=argparse.SUPPRESS)  # internal: run one part, rows to --rows
    parser.add_argument("--rows", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    g = torch.Generator().manual_seed(1)
    cases = [torch.randint(0, VOCAB, shape, generator=g) for shape in ((2, 77), (1, 1000), (1, args.seq))]
    if args.part:  # a child: one part, its rows as JSON
        with tempfile.TemporaryDirectory() as work:
            rows = run_part(args.part, args, cases, work)
        with open(args.rows, "w") as f:
            json.dump(rows, f)
        return 0
    os.makedirs(args.out, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "command": " ".join(sys.argv), "layers": args.layers, "seq": args.seq}
    print(json.dumps(meta), flush=True)
    rows, ok = [], True
    for part in args.parts.split(","):
        # each part in its own process (faulthandler on): a crash in one (a segfault in Inductor or the AOTI
        # runtime) is reported with its stack and the other parts still run
        print(f"=== {part}", flush=True)
        rows_path = os.path.join(args.out, f"rows_{part}.json")
        cmd = [sys.executable, "-X", "faulthandler", "-m", "bench.check_export_gpu", "--part", part,
               "--rows", rows_path,
               "--layers", str(args.layers), "--seq", str(args.seq), "--new", str(args.new)]
        try:
            run = subprocess.run(cmd, timeout=args.part_timeout_s, cwd=REPO)
            code = run.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
        if code == 0 and os.path.exists(rows_path):
            with open(rows_path) as f:
                part_rows = json.load(f)
            rows += part_rows
            ok &= all(r.get("ok", True) for r in part_rows)
        else:
            print(f"FAIL {part}: the part's process ended with {code}", flush=True)
            rows.append({"part": part, "ok": False, "error": f"process ended with {code}"})
            ok = False
        if part == "smoke" and not rows[-1].get("ok", False):
            print("the smoke package (no HySparse op) does not run: the other parts would fail the same way; "
                  "stopping here", flush=True)
            break
    with open(os.path.join(args.out, "check_export_gpu.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows, "ok": ok}, f, indent=1)
    print("ALL OK" if ok else "SOME CHECKS FAILED", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
