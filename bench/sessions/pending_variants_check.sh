#!/usr/bin/env bash
# For a device session (one call, <= 600 s), after pending_full_fwd.sh: the kernel variants that are off by default,
# checked at real sizes by check_gpu (bf16 against the fp32 reference, forward, gradients with the backward's
# recomputation, decode, extend), then decode's +inductor rows and the 8-layer model's forward against the original
# at its best with them. FULL_FWD names the full-forward variant pending_full_fwd.sh found fastest (default: the
# 2-D descriptor one), e.g. `FULL_FWD=tma2d_acc_128x64_w8_s3 bash bench/sessions/pending_variants_check.sh`.
# Rename to <date>_<letter>.sh once run.
BUDGET_S=${BUDGET_S:-570}; . "$(dirname "$0")/steps.sh"; mkdir -p "$W"
FULL_FWD=${FULL_FWD:-tma2d_acc_64x64_w4_s3}
mkdir -p "$W/e2e_variants" "$W/decode"
OUT="$W" TAIL=20 step check_gpu_variants 170 python -m bench.check_gpu --shapes 32/8/128,64/4/128 --seqlens 4096,32768 --bwd-seqlens 4096 --backends triton --orders block --extend 512 --full-fwd "$FULL_FWD" --combine fused --token-tma 2d
OUT="$W/decode" TAIL=20 step decode_inductor 120 python -m bench.bench_decode --contexts 131072 --batches 8 --budget-s 0 --skip-memory
TAIL=25 step bench_e2e_variants 220 python -m bench.bench_e2e --sections best --seqlens 8k,32k --calls 5 --budget-s 200 --full-fwd "$FULL_FWD" --out "$W/e2e_variants"
tar -C "$OUT" -czf "$OUT/session.tar.gz" s
