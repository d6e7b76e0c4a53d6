#!/usr/bin/env bash
# 2026-12-05, sixth session, device call 5 (results bench/results/h100_2026-12-05q_*): the forward at 128k against the
# original at its best on the new defaults (FWD_CONFIG with descriptors, TOKEN_TMA), with the model's own selections,
# then 32k on tile-correlated selections (token-major, where the descriptor loads help most).
BUDGET_S=${BUDGET_S:-300}; . "$(dirname "$0")/steps.sh"; mkdir -p "$W"
mkdir -p "$W/e2e_128k" "$W/e2e_tile_32k"
TAIL=12 step e2e_128k 170 python -m bench.bench_e2e --sections best --seqlens 128k --calls 5 --budget-s 150 --out "$W/e2e_128k"
TAIL=12 step e2e_tile_32k 100 python -m bench.bench_e2e --sections best --seqlens 32k --selections tile --calls 5 --budget-s 80 --out "$W/e2e_tile_32k"
tar -C "$OUT" -czf "$OUT/session.tar.gz" s
