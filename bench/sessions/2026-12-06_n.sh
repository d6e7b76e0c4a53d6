#!/usr/bin/env bash
# Call n of 2026-12-06 (ninth session), with the session's last device time: the 128k forward on tile-correlated
# selections (a trained model's locality) on this tree; 1.513x on the defaults before the sixth session (call l of
# 2026-12-05), not rerun since.
BUDGET_S=${BUDGET_S:-210}; . "$(dirname "$0")/steps.sh"; mkdir -p "$W"
mkdir -p "$W/e2e_tile_128k"
TAIL=12 step e2e_tile_128k 200 python -m bench.bench_e2e --sections best --seqlens 128k --selections tile --calls 5 --budget-s 185 --out "$W/e2e_tile_128k"
tar -C "$OUT" -czf "$OUT/session.tar.gz" s
