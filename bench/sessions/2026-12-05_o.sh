#!/usr/bin/env bash
# 2026-12-05, sixth session, device call 3 (00:04-00:07 UTC, 203 s; results bench/results/h100_2026-12-05o_*),
# left by the fifth session as pending_variants_check.sh, run as
# `sed -i 's/^TOKEN_TMA = False /TOKEN_TMA = True /' hysparse_compile/kernels/triton/sparse_attention.py` then
# `FULL_FWD=tma2d_acc_ws_128x64_w8_s3 bash bench/sessions/2026-12-05_o.sh` (FULL_FWD and --token-tma 4d are now the defaults below): check_gpu
# with the variants at real sizes (72 / 72 ok), decode's +inductor rows, and the 8-layer model's forward against the
# original at its best with them.
BUDGET_S=${BUDGET_S:-570}; . "$(dirname "$0")/steps.sh"; mkdir -p "$W"
FULL_FWD=${FULL_FWD:-tma2d_acc_ws_128x64_w8_s3}
mkdir -p "$W/e2e_variants" "$W/decode"
OUT="$W" TAIL=20 step check_gpu_variants 170 python -m bench.check_gpu --shapes 32/8/128,64/4/128 --seqlens 4096,32768 --bwd-seqlens 4096 --backends triton --orders block --extend 512 --full-fwd "$FULL_FWD" --combine fused --token-tma 4d
OUT="$W/decode" TAIL=20 step decode_inductor 120 python -m bench.bench_decode --contexts 131072 --batches 8 --budget-s 0 --skip-memory
TAIL=25 step bench_e2e_variants 220 python -m bench.bench_e2e --sections best --seqlens 8k,32k --calls 5 --budget-s 200 --full-fwd "$FULL_FWD" --out "$W/e2e_variants"
tar -C "$OUT" -czf "$OUT/session.tar.gz" s
