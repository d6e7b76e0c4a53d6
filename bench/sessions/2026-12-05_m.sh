#!/usr/bin/env bash
# 2026-12-05, sixth session, device call 1 (23:55-00:01 UTC, 339 s; results bench/results/h100_2026-12-05m_*),
# left by the fourth session as pending.sh: the GPU checks after that session's changes at both shapes (the full
# layer's backward on cuDNN; softcap keeps the Triton backward), the sparse layer's fwd+bwd with the recomputation the
# model does (SPEC §6's definition: bench_kernels --recompute), the 128k forward on this tree with the model's own
# selections, and the extend grid's full sample on the GPU (it did not finish in 80 s: 44 cases passed, none failed).
BUDGET_S=${BUDGET_S:-560}; . "$(dirname "$0")/steps.sh"; mkdir -p "$W"
OUT="$W" TAIL=15 step check_gpu 110 python -m bench.check_gpu --shapes 32/8/128,64/4/128 --seqlens 4096 --bwd-seqlens 4096 --backends triton
mv "$W/check_gpu.json" "$W/check_gpu_main.json" 2>/dev/null
OUT="$W" TAIL=15 step check_gpu_cap 70 python -m bench.check_gpu --shapes 32/8/128 --seqlens 4096 --bwd-seqlens 4096 --backends triton --softcap 30 --full-sinks
mkdir -p "$W/kernels" "$W/e2e_128k"
OUT="$W/kernels" TAIL=30 step kernels_recompute 130 python -m bench.bench_kernels --ops sparse --shapes 32/8/128,64/4/128 --seqlens 32768 --selections random,tile --backends triton --no-check --recompute --budget-s 110
TAIL=20 step bench_e2e_128k 160 python -m bench.bench_e2e --sections best --seqlens 128k --calls 5 --budget-s 140 --out "$W/e2e_128k"
TAIL=15 step grid_extend_full 80 python -m pytest -q -p no:cacheprovider tests/kernels/test_grid_extend.py --full -x
tar -C "$OUT" -czf "$OUT/session.tar.gz" s
