#!/usr/bin/env bash
# For the next device session (one call, ~100 s), left by the sixth session of 2026-12-05 (its device time ran out):
# the extend kernels on the new defaults. The full layer's extend launches the forward kernel with forward_config's
# tiles, since 2026-12-06 128-row tiles with K/V through tensor descriptors; check_gpu passed its extend rows on them
# (calls o and p), but the extend table of docs/benchmarks.md was timed with the pointer tiles (`2026-12-05_c.sh`).
# Rename to <date>_<letter>.sh once run.
BUDGET_S=${BUDGET_S:-90}; . "$(dirname "$0")/steps.sh"; mkdir -p "$W"
OUT="$W" TAIL=28 step bench_extend_triton 80 python -m bench.bench_extend --shapes 32/8/128,64/4/128 --rs 8,64,512 --backends reference,triton
tar -C "$OUT" -czf "$OUT/session.tar.gz" s
