"""The one timer of the benchmarks: `time_ms(fn, device)`.

On CUDA, `triton.testing.do_bench` (median of repeated calls, the L2 cache flushed before each) by default; with
`cuda_graph=True`, `triton.testing.do_bench_cudagraph` (the calls captured in a CUDA graph and replayed: launch
overhead out of the picture, as a served model runs decode); with `reps`, the mean of `reps` back-to-back calls
between two CUDA events (for steps cheaper than an L2 flush, such as one decode step replayed from a CUDA graph).
`samples_ms` gives each call's time, for model calls long enough that one call is one sample; `kernel_times` the
GPU time per call of each kernel `fn` launches (torch.profiler), for the `profile_*` scripts. On the CPU (`--smoke`
runs and dry runs), a `perf_counter` loop: the median, or the mean over `reps`.
"""
from __future__ import annotations

import statistics
import time

import torch


def samples_ms(fn, device, n: int = 7, warmup: int = 1) -> list[float]:
    """Milliseconds of each of `n` calls of `fn` after `warmup` untimed ones (CUDA events around each call on the
    GPU, perf_counter on the CPU): for calls long enough (a model's forward) that one timed call is one sample,
    reported as median and spread."""
    cuda = torch.device(device).type == "cuda"
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        if cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            out.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
    return out


def time_ms(fn, device, *, reps: int | None = None, cuda_graph: bool = False, grad_to_none=None,
            warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Time of one `fn()` in milliseconds (module docstring). device: where fn runs (torch.device or str)."""
    cuda = torch.device(device).type == "cuda"
    if cuda and cuda_graph:
        import triton.testing

        return float(triton.testing.do_bench_cudagraph(fn, rep=rep_ms // 2, return_mode="median"))
    if cuda and reps is None:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
                                             return_mode="median"))
    if reps is not None:
        if cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / reps
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) * 1e3 / reps
    fn()
    times: list[float] = []
    t_end = time.perf_counter() + rep_ms / 1e3
    while len(times) < 2 or (time.perf_counter() < t_end and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def kernel_times(fn, reps: int = 5, warmup: int = 2, width: int = 90) -> list[tuple[str, float, int]]:
    """(kernel name cut to `width`, GPU ms per call, launches per call) of every CUDA kernel `fn` launches, slowest
    first: `warmup` untimed calls, then `reps` calls under torch.profiler."""
    from collections import defaultdict

    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    totals, counts = defaultdict(float), defaultdict(int)
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            totals[evt.name[:width]] += evt.device_time / 1e3 / reps
            counts[evt.name[:width]] += 1
    return sorted(((n, t, counts[n] // reps) for n, t in totals.items()), key=lambda r: -r[1])
