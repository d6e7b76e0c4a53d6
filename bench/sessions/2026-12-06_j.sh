#!/usr/bin/env bash
# Call j of 2026-12-06 (ninth session). Call h measured the training peak with Inductor's peak-memory reordering off
# (torch 2.11: 8k 1.128x -> 1.055x the original's best, same speed); call i found the forward's peak under
# torch.compile 1.40x / 1.49x the compiled original's at 32k / 128k. Does the same option cut the forward's peak, and
# at what speed? First what is live at the 32k forward peak with it on and off, then the fair forward rows with it off.
BUDGET_S=${BUDGET_S:-520}; . "$(dirname "$0")/steps.sh"; mkdir -p "$W"
mkdir -p "$W/e2e_fwd_reorder_off"
TAIL=30 step memory_peak_32k 130 python -m bench.memory_peak --seqlen 32k --modes compile --model both
TAIL=30 step memory_peak_32k_reorder_off 130 python -m bench.memory_peak --seqlen 32k --modes compile --model both --inductor reorder_for_peak_memory=False
TAIL=14 step e2e_fwd_reorder_off 250 python -m bench.bench_e2e --sections best --seqlens 8k,32k,128k --calls 5 --budget-s 235 --inductor reorder_for_peak_memory=False --out "$W/e2e_fwd_reorder_off"
tar -C "$OUT" -czf "$OUT/session.tar.gz" s
