#!/usr/bin/env bash
# Call i of 2026-12-06 (ninth session), on the machine call h left warm: the fair forward rows on this tree (after
# the gate fix, graph_ops.exporting(), and the no-copy op boundary), 8k / 32k / 128k.
BUDGET_S=${BUDGET_S:-300}; . "$(dirname "$0")/steps.sh"; mkdir -p "$W"
mkdir -p "$W/e2e_fwd"
TAIL=14 step e2e_fwd 290 python -m bench.bench_e2e --sections best --seqlens 8k,32k,128k --calls 5 --budget-s 270 --out "$W/e2e_fwd"
tar -C "$OUT" -czf "$OUT/session.tar.gz" s
