#!/usr/bin/env bash
# 2026-12-05, fourth session, device call 5 (the last ~6 device minutes; 187 s; results
# bench/results/h100_2026-12-05l_*): the forward at 128k on tile-correlated selections against the original at its
# best in one call (call j's compiled originals ran out of memory beside the bench's logits check, which now stops at
# 32k).
BUDGET_S=${BUDGET_S:-220}; . "$(dirname "$0")/steps.sh"; mkdir -p "$W"
mkdir -p "$W/e2e_tile_128k"
TAIL=25 step bench_e2e_tile_128k 200 python -m bench.bench_e2e --sections best --seqlens 128k --selections tile --calls 5 --budget-s 180 --out "$W/e2e_tile_128k"
tar -C "$OUT" -czf "$OUT/session.tar.gz" s
