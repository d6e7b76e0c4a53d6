#!/usr/bin/env bash
# Call t of 2026-12-06 (tenth session), after the review: the runtime's fused-write dispatch moved into one helper
# (runtime.layers._write_fused) that also leaves jit traces to the scatters (functional.tracing()); the kernel is
# call s's. Its tests on CUDA, then the 128k batch-8 decode row with the fused writes and the scatters.
BUDGET_S=${BUDGET_S:-200}; . "$(dirname "$0")/steps.sh"; mkdir -p "$W"
mkdir -p "$W/dec"
TAIL=6 step pytest_cache_write 90 python -m pytest -q -p no:cacheprovider -o addopts="" tests/runtime/test_cache_write.py
OUT="$W/dec" TAIL=8 step decode 100 python -m bench.bench_decode --contexts 131072 --batches 8 --budget-s 0 --skip-memory --inductor none --writes both
tar -C "$OUT" -czf "$OUT/session.tar.gz" s
