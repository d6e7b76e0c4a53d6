#!/usr/bin/env bash
# Pending from the twelfth session of 2026-12-06 (its device time ran out): (1) the full layer's forward on a
# persistent grid (`FWD_CONFIG["persist"]`, programs per SM walking the same heaviest-first tile order; issue #22
# item 3), built and checked on the CPU only (interpreter; the default's sm_90 SASS is byte-identical, the persistent
# one compiles at 255 registers with a 56-byte stack outside the key loop): checked and timed against the default
# and SDPA cuDNN at 8k / 32k / 128k; (2) the model's fwd+bwd at 32k against the original at its best on the tree
# whose block-major forward builds its lists with one sort (call ab timed the forward only). Rename it to
# bench/sessions/<date>_<letter>.sh when it runs; if a persistent variant wins, time the model's forward with it
# (`bench_e2e --full-fwd <variant>`).
BUDGET_S=${BUDGET_S:-580}; . "$(dirname "$0")/steps.sh"; mkdir -p "$W"
mkdir -p "$W/full" "$W/e2e_fwdbwd"
OUT="$W/full" TAIL=30 step full_fwd_persist 330 python -m bench.full_fwd_variants --shapes 32/8/128 --seqlens 8192,32768,131072 --variants tma2d_acc_ws_128x64_w8_s3_p1,tma2d_acc_ws_128x64_w8_s3_p2,tma2d_acc_128x64_w8_s3_p1
TAIL=12 step e2e_fwdbwd 200 python -m bench.bench_e2e --sections best_fwdbwd --seqlens 32k --calls 5 --budget-s 190 --out "$W/e2e_fwdbwd"
tar -C "$OUT" -czf "$OUT/session.tar.gz" s
