#!/usr/bin/env bash
# 2026-12-05, fourth session, device call 3 (19:01-19:05 UTC, 255 s; results bench/results/h100_2026-12-05j_*):
# fwd+bwd at 32k against the original at its best with the full layer's backward on cuDNN
# (bench/sessions/2026-12-05_i.sh checked and timed it); the forward at 128k with the sparse layers on tile-correlated
# selections (call h ran out of budget before it); what is live at the peak of torch.compile(compiled)'s forward, with
# the Python frames that made it (memory_peak.py kept only C++ frames in call h).
BUDGET_S=${BUDGET_S:-540}; . "$(dirname "$0")/steps.sh"; mkdir -p "$W"
mkdir -p "$W/e2e_fwdbwd_32k" "$W/e2e_tile_128k"
TAIL=25 step bench_e2e_fwdbwd_32k 270 python -m bench.bench_e2e --sections best_fwdbwd --seqlens 32k --calls 5 --budget-s 250 --out "$W/e2e_fwdbwd_32k"
TAIL=25 step bench_e2e_tile_128k 190 python -m bench.bench_e2e --sections best --seqlens 128k --selections tile --calls 5 --budget-s 170 --out "$W/e2e_tile_128k"
TAIL=60 step memory_peak_32k 70 python -m bench.memory_peak --seqlen 32k --modes compile
tar -C "$OUT" -czf "$OUT/session.tar.gz" s
