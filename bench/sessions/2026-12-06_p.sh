#!/usr/bin/env bash
# Call p of 2026-12-06 (tenth session). Decode's cache writes in one Triton launch per layer
# (kernels/triton/cache_write.py; the runtime's default on CUDA): on the H100 the two scatter_s per layer took
# 5.2 us each, plus a remainder kernel per ring layer (84 + 9 us of a 6.54 ms step, call h of 2026-12-05). First
# the runtime tests of the fused writes on CUDA (the cache bytes and a cached decode's logits against the scatters),
# then the decode row at 128k batch 8 with the fused writes and with the scatters, twice each in turn (the
# target: >= 2.05x the dense floor; 2.048x in call o of 2026-12-05). Then the two check_gpu runs call o had no time
# for: the model's (hf) layout with extend, softcap with full-layer sinks.
BUDGET_S=${BUDGET_S:-480}; . "$(dirname "$0")/steps.sh"; mkdir -p "$W"
mkdir -p "$W/dec1" "$W/dec2" "$W/hf" "$W/cap"
TAIL=6 step pytest_cache_write 90 python -m pytest -q -p no:cacheprovider -o addopts="" tests/runtime/test_cache_write.py
OUT="$W/dec1" TAIL=12 step decode_1 110 python -m bench.bench_decode --contexts 131072 --batches 8 --budget-s 0 --skip-memory --inductor none --writes both
OUT="$W/dec2" TAIL=12 step decode_2 110 python -m bench.bench_decode --contexts 131072 --batches 8 --budget-s 0 --skip-memory --inductor none --writes both
OUT="$W/hf" TAIL=4 step check_gpu_hf 70 python -m bench.check_gpu --shapes 32/8/128 --seqlens 4096 --bwd-seqlens 4096 --backends triton --layout hf --extend 512
OUT="$W/cap" TAIL=4 step check_gpu_cap 60 python -m bench.check_gpu --shapes 32/8/128 --seqlens 4096 --bwd-seqlens 4096 --backends triton --softcap 30 --full-sinks
tar -C "$OUT" -czf "$OUT/session.tar.gz" s
