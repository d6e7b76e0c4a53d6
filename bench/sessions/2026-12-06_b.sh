#!/usr/bin/env bash
# 2026-12-06, seventh session, device call 2 (results bench/results/h100_2026-12-06b_*): check_gpu at both shapes on
# this tree (call a's ran past its 70 s limit after 54 rows, all ok; extend now takes descriptor tiles from R = 512,
# as calls o and p of 2026-12-05 checked them); what is live at the peak of
# one training step at 8k, torch.compile(compiled) against the original's compile[causal] (the fwd+bwd peak is 1.18x
# the original's there, 1.04x eager vs eager: bench/memory_peak.py --backward sums it by phase and frame); then the
# model's forward at 8k / 32k on the full layer's current forward default (2-D descriptors) and on the 4-D one that
# had the best mean in call a's bench.full_fwd_variants (1.253x against 1.288x cuDNN), in the same call.
BUDGET_S=${BUDGET_S:-585}; . "$(dirname "$0")/steps.sh"; mkdir -p "$W"
mkdir -p "$W/e2e_2d" "$W/e2e_4d"
OUT="$W" TAIL=6 step check_gpu 110 python -m bench.check_gpu --shapes 32/8/128,64/4/128 --seqlens 4096 --bwd-seqlens 4096 --backends triton
TAIL=90 step memory_peak_8k 200 python -m bench.memory_peak --seqlen 8k --modes compile --model both --backward --top 25
TAIL=12 step e2e_2d 120 python -m bench.bench_e2e --sections best --seqlens 8k,32k --calls 5 --budget-s 100 --out "$W/e2e_2d"
TAIL=12 step e2e_4d 120 python -m bench.bench_e2e --sections best --seqlens 8k,32k --calls 5 --budget-s 100 --full-fwd tma_acc_ws_128x64_w8_s3 --out "$W/e2e_4d"
tar -C "$OUT" -czf "$OUT/session.tar.gz" s
