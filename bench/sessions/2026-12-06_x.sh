#!/usr/bin/env bash
# Call x of 2026-12-06 (eleventh session): the check call w missed (the block-major backward with token_lists' int16
# keys, at 4k; both orders of the forward), then the 128k forward against the original at its best once more (call w:
# 1.526x, 1.518-1.533x), for its spread across calls.
# Ran 14:23 UTC on an H100 (215 s); results bench/results/h100_2026-12-06x_*.
BUDGET_S=${BUDGET_S:-300}; . "$(dirname "$0")/steps.sh"; mkdir -p "$W"
OUT="$W" TAIL=4 step check_gpu 80 python -m bench.check_gpu --shapes 32/8/128 --seqlens 4096 --bwd-seqlens 4096 --backends triton --orders token,block
mkdir -p "$W/e2e_128k"
TAIL=14 step e2e_128k 180 python -m bench.bench_e2e --sections best --seqlens 128k --calls 5 --budget-s 170 --out "$W/e2e_128k"
tar -C "$OUT" -czf "$OUT/session.tar.gz" s
