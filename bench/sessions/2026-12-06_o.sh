#!/usr/bin/env bash
# Call o of 2026-12-06 (tenth session): the check the ninth session left pending. bench/check_gpu.py had not run
# since the full forward's off-diagonal loop became one tl.range(..., warp_specialize=WS) (fe71921; call l checked
# that kernel with full_fwd_variants only): both shapes on the contiguous layout, the model's (hf) layout with
# extend, then softcap with full-layer sinks.
BUDGET_S=${BUDGET_S:-300}; . "$(dirname "$0")/steps.sh"; mkdir -p "$W"
mkdir -p "$W/main" "$W/hf" "$W/cap"
OUT="$W/main" TAIL=4 step check_gpu 110 python -m bench.check_gpu --shapes 32/8/128,64/4/128 --seqlens 4096,32768 --bwd-seqlens 4096 --backends triton --extend 512
OUT="$W/hf" TAIL=4 step check_gpu_hf 70 python -m bench.check_gpu --shapes 32/8/128 --seqlens 4096 --bwd-seqlens 4096 --backends triton --layout hf --extend 512
OUT="$W/cap" TAIL=4 step check_gpu_cap 60 python -m bench.check_gpu --shapes 32/8/128 --seqlens 4096 --bwd-seqlens 4096 --backends triton --softcap 30 --full-sinks
tar -C "$OUT" -czf "$OUT/session.tar.gz" s
