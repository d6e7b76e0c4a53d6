#!/usr/bin/env bash
# For the next device session (one call, ~330 s), left by the seventh session of 2026-12-06 (its device time ran out
# after calls a and b: starts were refused six times). First what is live at the peak of one training step at 8k,
# every allocation listed (call b's table stopped at 25 rows), grouped by phase, site and block size: the compiled
# model's fwd+bwd peak is 1.18x the original's under torch.compile (13.72 against 11.66 GiB) and about 1.65 GiB of it
# has no known cause (graph_ops.gate_sigmoid removed a duplicate that torch 2.13's Inductor keeps; the GPU's torch
# 2.11 peak did not move, to the byte). Then the model's forward at 8k / 32k on the full layer's forward default
# (2-D descriptors) and on the 4-D one that had the best mean in call a's bench.full_fwd_variants (1.253x against
# 1.288x cuDNN), in the same call; change FWD_CONFIG only if the model's rows move.
# Rename to <date>_<letter>.sh once run.
BUDGET_S=${BUDGET_S:-330}; . "$(dirname "$0")/steps.sh"; mkdir -p "$W"
mkdir -p "$W/e2e_2d" "$W/e2e_4d"
TAIL=80 step memory_peak_8k 60 python -m bench.memory_peak --seqlen 8k --modes compile --model both --backward --top 3
TAIL=12 step e2e_2d 125 python -m bench.bench_e2e --sections best --seqlens 8k,32k --calls 5 --budget-s 105 --out "$W/e2e_2d"
TAIL=12 step e2e_4d 125 python -m bench.bench_e2e --sections best --seqlens 8k,32k --calls 5 --budget-s 105 --full-fwd tma_acc_ws_128x64_w8_s3 --out "$W/e2e_4d"
tar -C "$OUT" -czf "$OUT/session.tar.gz" s
