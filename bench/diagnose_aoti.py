"""Why does a CUDA AOTInductor package crash when it loads on the lent GPU? A two-layer MLP (no HySparse op) is
packaged in several build variants and each is loaded and run in its own fresh process; a crash is reported with
its exit code and the end of its output, so one device call narrows the cause.

    python -m bench.diagnose_aoti [--out DIR] [--variants default,weights_off_so,...]

Variants (device, inductor_configs passed to `aoti_compile_and_package`): see VARIANTS. Each package is loaded in
its own process (side by side), also with run_single_threaded=True for the plain CPU and CUDA ones, and the CUDA
package's .so through the lower-level `torch._C._aoti.AOTIModelContainerRunnerCuda`. The machine has no gdb, so a
small signal handler (bench/tools/segv_backtrace.c, built with gcc here) prints the native stack of a crash.

First run (2026-11-30, H200, torch 2.11.0+cu130, g++ 13.3): every package crashed in the loader's constructor,
the CPU one too; dlopen of the extracted .so alone worked; metadata read fine.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import zipfile

import torch

VARIANTS = {  # name: (device, inductor_configs)
    "cpu": ("cpu", {}),
    "cuda": ("cuda", {}),
    "cpu_O0": ("cpu", {"aot_inductor.compile_wrapper_opt_level": "O0"}),
    "cuda_O0": ("cuda", {"aot_inductor.compile_wrapper_opt_level": "O0"}),
    "cpu_no_link_libtorch": ("cpu", {"aot_inductor.link_libtorch": False}),
    "cuda_weights_off_so": ("cuda", {"aot_inductor.package_constants_in_so": False}),
    "cuda_embed_kernels": ("cuda", {"aot_inductor.embed_kernel_binary": True}),
    # the fix to_aoti applies (export/aoti.py::link_configs): the shared C++ runtime named for the link
    "cpu_shared_runtime": ("cpu", {"aot_inductor.custom_op_libs": [":libstdc++.so.6"]}),
    "cuda_shared_runtime": ("cuda", {"aot_inductor.custom_op_libs": [":libstdc++.so.6"]}),
}
HERE = os.path.dirname(os.path.abspath(__file__))

PRELUDE = textwrap.dedent("""
    import ctypes, sys, torch
    def backtrace_on_crash():
        if len(sys.argv) > 1 and sys.argv[-1].endswith(".so"):
            ctypes.CDLL(sys.argv[-1]).hysparse_install_backtrace()
""")

LOAD = PRELUDE + textwrap.dedent("""
    path, device, x_path, ref_path, single = sys.argv[1:6]
    if device == "cuda":
        torch.zeros(1, device="cuda")
    backtrace_on_crash()
    runner = torch._inductor.aoti_load_package(path, run_single_threaded=single == "1")
    print("loaded", flush=True)
    y = runner(torch.load(x_path).to(device))
    print("ran, max |diff|", float((y.cpu() - torch.load(ref_path)).abs().max()), flush=True)
""")

RUNNER = PRELUDE + textwrap.dedent("""
    so, cubin_dir, x_path, ref_path = sys.argv[1:5]
    torch.zeros(1, device="cuda")
    backtrace_on_crash()
    runner = torch._C._aoti.AOTIModelContainerRunnerCuda(so, 1, "cuda", cubin_dir)
    print("runner constructed", flush=True)
    y = runner.run([torch.load(x_path).cuda()])
    print("ran, max |diff|", float((y[0].cpu() - torch.load(ref_path)).abs().max()), flush=True)
""")


def start(code: str, *argv: str) -> tuple:
    """Start `code` in a fresh python (no faulthandler: the native handler prints the stack instead)."""
    proc = subprocess.Popen([sys.executable, "-c", code, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    return proc, time.perf_counter()


def finish(started: tuple, timeout: float = 240) -> dict:
    proc, t0 = started
    try:
        out, err = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        rc = "timeout"
    native = [line for line in err.splitlines() if line.startswith("native")]
    if native and shutil.which("c++filt"):
        native = subprocess.run(["c++filt"], input="\n".join(native), capture_output=True, text=True).stdout.splitlines()
    return {"rc": rc, "s": round(time.perf_counter() - t0, 1), "stdout": out[-1500:],
            "stderr": "\n".join(l for l in err.splitlines() if not l.startswith("native"))[-1500:],
            "native": native[:40]}


def show(name: str, result: dict) -> None:
    print(f"--- {name}: exit {result['rc']} ({result['s']} s)\n{result['stdout'].strip()}\n"
          f"{result['stderr'].strip()[-800:]}", flush=True)
    for line in result["native"]:
        print("   ", line[:400], flush=True)


def mlp() -> tuple[torch.nn.Module, torch.Tensor]:
    """The probe: a two-layer MLP (no HySparse op anywhere) and an input batch."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 8)).eval()
    return model, torch.randn(4, 64)


def package(model: torch.nn.Module, x: torch.Tensor, device: str, configs: dict, path: str) -> str:
    """`model` on `device` as an AOTI package at `path` (dynamic batch), built with `configs`."""
    m, xd = model.to(device), x.to(device)
    ep = torch.export.export(m, (xd,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))
    t0 = time.perf_counter()
    torch._inductor.aoti_compile_and_package(ep, package_path=path, inductor_configs=configs)
    print(f"built {os.path.basename(path)} in {time.perf_counter() - t0:.1f} s, {os.path.getsize(path) / 2**10:.0f} KiB",
          flush=True)
    return path


def build(variant: str, work: str, x: torch.Tensor, model: torch.nn.Module) -> str:
    device, configs = VARIANTS[variant]
    return package(model, x, device, configs, os.path.join(work, f"{variant}.pt2"))


def _inductor_cxx() -> str:
    from torch._inductor.cpp_builder import get_cpp_compiler

    return get_cpp_compiler()


def environment() -> dict:
    def sh(cmd):
        try:
            return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=30).stdout.strip()[-800:]
        except Exception as e:  # a diagnostic: report and go on
            return repr(e)

    return {"torch": torch.__version__, "cuda": torch.version.cuda, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "driver": sh("nvidia-smi --query-gpu=driver_version --format=csv,noheader"),
            "gxx": sh("g++ --version | head -1"), "gdb": shutil.which("gdb"),
            "inductor_cxx": _inductor_cxx(), "CXX": os.environ.get("CXX"), "LDFLAGS": os.environ.get("LDFLAGS"),
            "compiler_libstdcxx_so": sh("g++ -print-file-name=libstdc++.so"),
            "libcuda": sh("ldconfig -p | grep -E 'libcuda.so'"), "tmp_mount": sh("findmnt -T /tmp -o OPTIONS -n")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    p.add_argument("--variants", default=",".join(VARIANTS))
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    env = environment()
    print(json.dumps(env, indent=1), flush=True)
    model, x = mlp()
    results: dict = {"env": env}
    with tempfile.TemporaryDirectory() as work, torch.no_grad():
        handler = os.path.join(work, "segv_backtrace.so")
        subprocess.run(["gcc", "-shared", "-fPIC", "-O0", "-o", handler, os.path.join(HERE, "tools", "segv_backtrace.c"),
                        "-ldl"], check=True)
        xp, refp = os.path.join(work, "x.pt"), os.path.join(work, "ref.pt")
        torch.save(x, xp)
        torch.save(model(x), refp)
        runs = {}
        for variant in args.variants.split(","):
            try:
                path = build(variant, work, x, model)
            except Exception as e:  # reported; the next variant still runs
                results[variant] = {"build_error": f"{type(e).__name__}: {str(e)[:1500]}"}
                print(f"--- {variant}: build failed: {results[variant]['build_error']}", flush=True)
                continue
            device = VARIANTS[variant][0]
            runs[variant] = start(LOAD, path, device, xp, refp, "0", handler)  # the loads run side by side
            if variant in ("cpu", "cuda"):
                runs[variant + "_single_threaded"] = start(LOAD, path, device, xp, refp, "1", handler)
            if variant == "cuda":
                extracted = os.path.join(work, "extracted")
                with zipfile.ZipFile(path) as z:
                    z.extractall(extracted)
                    sos = [os.path.join(extracted, n) for n in z.namelist() if n.endswith(".so")]
                print("cuda package's .so:", sos, flush=True)
                if sos:
                    runs["cuda_container_runner"] = start(RUNNER, sos[0], os.path.dirname(sos[0]), xp, refp, handler)
        for name, started in runs.items():
            results[name] = finish(started)
            show(name, results[name])
    with open(os.path.join(args.out, "diagnose_aoti.json"), "w") as f:
        json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
