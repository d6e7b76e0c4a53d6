#!/usr/bin/env bash
# 2026-12-06, seventh session, device call 2 (results bench/results/h100_2026-12-06b_*): check_gpu at both shapes on
# this tree (call a's ran past its 70 s limit after 54 rows, all ok; extend now takes descriptor tiles from R = 512,
# as calls o and p of 2026-12-05 checked them); the fair fwd+bwd rows at 8k / 32k with the gates' sigmoid as an
# opaque op under torch.compile (graph_ops.gate_sigmoid: Inductor kept each sparse layer's gate projection output
# beside its gates; the peaks were 13.72 / 40.43 GiB against 11.66 / 36.13 in call p of 2026-12-05); then what is
# live at the peak of one training step at 8k, torch.compile(compiled) against the original's compile[causal]
# (bench/memory_peak.py --backward sums it by phase and frame).
BUDGET_S=${BUDGET_S:-450}; . "$(dirname "$0")/steps.sh"; mkdir -p "$W"
mkdir -p "$W/e2e_fwdbwd"
OUT="$W" TAIL=6 step check_gpu 100 python -m bench.check_gpu --shapes 32/8/128,64/4/128 --seqlens 4096 --bwd-seqlens 4096 --backends triton
TAIL=25 step e2e_fwdbwd 170 python -m bench.bench_e2e --sections best_fwdbwd --seqlens 8k,32k --calls 5 --budget-s 150 --out "$W/e2e_fwdbwd"
TAIL=90 step memory_peak_8k 150 python -m bench.memory_peak --seqlen 8k --modes compile --model both --backward --top 25
tar -C "$OUT" -czf "$OUT/session.tar.gz" s
