#!/usr/bin/env bash
# 2026-12-06, seventh session, device call 3 (results bench/results/h100_2026-12-06c_*): what is live at the peak of
# one training step at 8k again, every allocation listed (call b's table stopped at 25 rows), grouped by phase, site
# and block size; then the model's forward at 32k on the full layer's forward default (2-D descriptors) and on
# the 4-D one that had the best mean in call a's bench.full_fwd_variants (1.253x against 1.288x cuDNN), same call.
BUDGET_S=${BUDGET_S:-290}; . "$(dirname "$0")/steps.sh"; mkdir -p "$W"
mkdir -p "$W/e2e_2d" "$W/e2e_4d"
TAIL=80 step memory_peak_8k 60 python -m bench.memory_peak --seqlen 8k --modes compile --model both --backward --top 3
TAIL=12 step e2e_2d 110 python -m bench.bench_e2e --sections best --seqlens 32k --calls 5 --budget-s 90 --out "$W/e2e_2d"
TAIL=12 step e2e_4d 110 python -m bench.bench_e2e --sections best --seqlens 32k --calls 5 --budget-s 90 --full-fwd tma_acc_ws_128x64_w8_s3 --out "$W/e2e_4d"
tar -C "$OUT" -czf "$OUT/session.tar.gz" s
