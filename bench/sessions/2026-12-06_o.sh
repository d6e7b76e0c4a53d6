#!/usr/bin/env bash
# Call o of 2026-12-06 (tenth session). First the check the ninth session left pending: bench/check_gpu.py had not
# run since the full forward's off-diagonal loop became one tl.range(..., warp_specialize=WS) (fe71921; call l
# checked that kernel with full_fwd_variants only). Then the queued candidates (`pend`, full_attention._fwd_kernel's
# PEND): a block that beats a row's worst entry is queued, and the running top list takes the queue when some row's
# is full (one branch per tile) and after the loop. By the sm_90 SASS (bench.sass_loops, Triton 3.9) the loop's
# always-run path is 383-396 instructions against the per-block update's 420, the flush 356 / 755 / 1496 at
# pend 4 / 8 / 16; simulated flush counts make it a win only for long rows (128k), a loss at 8k. check_gpu with the
# pend8 variant at real sizes (indices against the reference), then the variants timed against cuDNN.
# Ran at 84a2cd4 (the queue's code): check_gpu 92/92 and 46/46 with pend8, every pend variant slower than the
# per-block update at 8k, 32k and 128k (docs/benchmarks.md, "Tenth session"); the queue was taken out again after
# this call, so the pend variants below exist only at 84a2cd4.
BUDGET_S=${BUDGET_S:-560}; . "$(dirname "$0")/steps.sh"; mkdir -p "$W"
mkdir -p "$W/main" "$W/pend8" "$W/ffv"
OUT="$W/main" TAIL=4 step check_gpu 110 python -m bench.check_gpu --shapes 32/8/128,64/4/128 --seqlens 4096,32768 --bwd-seqlens 4096 --backends triton --extend 512
OUT="$W/pend8" TAIL=4 step check_gpu_pend8 80 python -m bench.check_gpu --shapes 32/8/128 --seqlens 4096,32768 --bwd-seqlens 4096 --backends triton --extend 512 --full-fwd tma2d_acc_ws_128x64_w8_s3_pend8
P=tma2d_acc_ws_128x64_w8_s3
TAIL=40 step full_fwd_variants 330 python -m bench.full_fwd_variants --shapes 32/8/128 --seqlens 8192,32768,131072 --variants $P,${P}_pend4,${P}_pend8,${P}_pend16,tma2d_acc_128x64_w8_s3_pend8 --out "$W/ffv"
tar -C "$OUT" -czf "$OUT/session.tar.gz" s
