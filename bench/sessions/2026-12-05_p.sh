#!/usr/bin/env bash
# 2026-12-05, sixth session, device call 4 (after calls m, n, o; results bench/results/h100_2026-12-05p_*): the new
# defaults (FWD_CONFIG = tma2d_acc_ws_128x64_w8_s3, TOKEN_TMA = 4-D descriptors) against the old ones in the same call,
# end to end (forward at 8k / 32k against the original at its best), after check_gpu on the defaults; then the
# sparse kernel rows and fwd+bwd at 8k / 32k with the new defaults.
BUDGET_S=${BUDGET_S:-585}; . "$(dirname "$0")/steps.sh"; mkdir -p "$W"
mkdir -p "$W/e2e_old" "$W/e2e_new" "$W/e2e_fwdbwd" "$W/kernels_sparse"
OUT="$W" TAIL=6 step check_gpu_defaults 60 python -m bench.check_gpu --shapes 32/8/128 --seqlens 4096 --bwd-seqlens 4096 --backends triton
TAIL=12 step e2e_old 110 python -m bench.bench_e2e --sections best --seqlens 8k,32k --calls 5 --budget-s 90 --full-fwd ptr_64x64_w4_s3 --token-tma off --out "$W/e2e_old"
TAIL=12 step e2e_new 110 python -m bench.bench_e2e --sections best --seqlens 8k,32k --calls 5 --budget-s 90 --out "$W/e2e_new"
OUT="$W/kernels_sparse" TAIL=12 step kernels_sparse 50 python -m bench.bench_kernels --ops sparse --shapes 32/8/128,64/4/128 --seqlens 32768 --selections random,tile --backends triton --no-check --no-bwd --budget-s 40
TAIL=25 step e2e_fwdbwd 260 python -m bench.bench_e2e --sections best_fwdbwd --seqlens 8k,32k --calls 5 --budget-s 240 --out "$W/e2e_fwdbwd"
tar -C "$OUT" -czf "$OUT/session.tar.gz" s
