#!/usr/bin/env bash
# Call ad of 2026-12-06 (thirteenth session): check_gpu on the final tree, after the persistent full forward was
# removed (its kernel source back to bb18a2a^'s, whose default SASS the persistent build left byte-identical): every
# op at 4k and 32k in the contiguous layout and in the model's (HF) layout, extend at R = 512 over 32k included.
BUDGET_S=${BUDGET_S:-300}; . "$(dirname "$0")/steps.sh"; mkdir -p "$W/contiguous" "$W/hf"
OUT="$W/contiguous" TAIL=3 step check_gpu 140 python -m bench.check_gpu --shapes 32/8/128 --seqlens 4096,32768 --bwd-seqlens 4096 --backends triton
OUT="$W/hf" TAIL=3 step check_gpu_hf 140 python -m bench.check_gpu --shapes 32/8/128 --seqlens 4096,32768 --bwd-seqlens 4096 --backends triton --layout hf
tar -C "$OUT" -czf "$OUT/session.tar.gz" s
