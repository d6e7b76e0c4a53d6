#!/usr/bin/env bash
# Pending from the thirteenth session of 2026-12-06 (no device could be started for it): the model's forward at 32k against the original at its best on the
# final tree (after the persistent full forward's removal and block_partials taking its chunk's lists; the last
# forward rows, call ab, ran before both; the fwd+bwd rows of call ac after the second). Rename it to
# bench/sessions/<date>_<letter>.sh when it runs.
BUDGET_S=${BUDGET_S:-200}; . "$(dirname "$0")/steps.sh"; mkdir -p "$W/e2e"
TAIL=10 step e2e 190 python -m bench.bench_e2e --sections best --seqlens 32k --calls 5 --budget-s 170 --out "$W/e2e"
tar -C "$OUT" -czf "$OUT/session.tar.gz" s
