#!/usr/bin/env bash
# 2026-12-05, fourth session, device call 2 (18:52-18:59 UTC, 358 s; results bench/results/h100_2026-12-05i_*): the
# full layer's backward through cuDNN (issue #22 item 3, `kernels/triton/full_attention_bwd_cudnn.py`): its stats
# layout probed, gradients against the reference with each engine forced, times of both engines beside SDPA cuDNN;
# check_gpu's backward rows on the new default; fwd+bwd at 8k against the original at its best; the forward at 8k with
# one gate per head instead of per channel (what the paper's per-channel gate projection costs end to end).
BUDGET_S=${BUDGET_S:-560}; . "$(dirname "$0")/steps.sh"; mkdir -p "$W"
OUT="$W" TAIL=40 step full_bwd_engines 150 python -m bench.full_bwd_engines
OUT="$W" TAIL=30 step check_gpu_bwd 80 python -m bench.check_gpu --shapes 32/8/128 --seqlens 4096 --bwd-seqlens 4096 --full-sinks --backends triton
mkdir -p "$W/e2e_fwdbwd" "$W/e2e_gate_head"
TAIL=25 step bench_e2e_fwdbwd_8k 200 python -m bench.bench_e2e --sections best_fwdbwd --seqlens 8k --calls 5 --budget-s 140 --profile 8192 --profile-fwdbwd 8192 --out "$W/e2e_fwdbwd"
TAIL=25 step bench_e2e_gate_head_8k 130 python -m bench.bench_e2e --sections best --seqlens 8k --gate head --budget-s 100 --out "$W/e2e_gate_head"
tar -C "$OUT" -czf "$OUT/session.tar.gz" s
