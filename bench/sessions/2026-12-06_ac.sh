#!/usr/bin/env bash
# Call ac of 2026-12-06 (thirteenth session; the twelfth session's pending.sh): (1) the full layer's forward on a
# persistent grid (`FWD_CONFIG["persist"]`, programs per SM walking the same heaviest-first tile order; issue #22
# item 3), built and checked on the CPU only before this call (interpreter; the default's sm_90 SASS is
# byte-identical): check_gpu with every full-layer op on the persistent variant, then timed against the default and
# SDPA cuDNN at 8k / 32k / 128k; (2) the model's fwd+bwd at 32k against the original at its best on the tree whose
# block-major forward builds its lists with one sort (call ab timed the forward only). Ran at 0e4a58c; the
# persistent grid was slower and is removed after it, with its variants (`..._p1`, `..._p2`; code at bb18a2a).
BUDGET_S=${BUDGET_S:-590}; . "$(dirname "$0")/steps.sh"; mkdir -p "$W"
mkdir -p "$W/full" "$W/e2e_fwdbwd"
OUT="$W" TAIL=4 step check_gpu_persist 110 python -m bench.check_gpu --shapes 32/8/128 --seqlens 4096,32768 --bwd-seqlens 4096 --backends triton --full-fwd tma2d_acc_ws_128x64_w8_s3_p1
OUT="$W/full" TAIL=30 step full_fwd_persist 330 python -m bench.full_fwd_variants --shapes 32/8/128 --seqlens 8192,32768,131072 --variants tma2d_acc_ws_128x64_w8_s3_p1,tma2d_acc_ws_128x64_w8_s3_p2,tma2d_acc_128x64_w8_s3_p1
TAIL=12 step e2e_fwdbwd 200 python -m bench.bench_e2e --sections best_fwdbwd --seqlens 32k --calls 5 --budget-s 190 --out "$W/e2e_fwdbwd"
tar -C "$OUT" -czf "$OUT/session.tar.gz" s
