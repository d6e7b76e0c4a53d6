#!/usr/bin/env bash
# Call q of 2026-12-06 (tenth session). Call p's runtime test of the fused cache writes failed on CUDA only because
# the test moved a model compiled on the CPU to the GPU (the captured graph asserts the CPU); the test now builds and
# compiles on the device. Rerun it, then the whole decode table (32k and 128k, batch 1 and 8) with the fused writes
# and with the scatters, in turn.
BUDGET_S=${BUDGET_S:-300}; . "$(dirname "$0")/steps.sh"; mkdir -p "$W"
mkdir -p "$W/dec"
TAIL=6 step pytest_cache_write 90 python -m pytest -q -p no:cacheprovider -o addopts="" tests/runtime/test_cache_write.py
OUT="$W/dec" TAIL=16 step decode_table 200 python -m bench.bench_decode --contexts 32768,131072 --batches 1,8 --budget-s 0 --skip-memory --inductor none --writes both
tar -C "$OUT" -czf "$OUT/session.tar.gz" s
