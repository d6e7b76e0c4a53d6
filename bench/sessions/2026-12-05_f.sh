#!/usr/bin/env bash
# 2026-12-05, third session, device call 3 (issue 22 items 1-2): call (e)'s combine kernel was 6.0 ms at 32k (its
# 3-D load reduced over slots across warps); rewritten as a per-slot unrolled stream (no cross-thread reduction),
# partials kernel at 3 stages, last kernel at 4 warps. Checks of the block order (forced) on the final kernels, its
# profile against the tree before this session's kernel change (37a62b9, carried as .bench_base), the kernel rows,
# then the end-to-end forward against the original at its best on the final kernels.
BUDGET_S=${BUDGET_S:-580}; . "$(dirname "$0")/steps.sh"; mkdir -p "$W/main" "$W/e2e"
OUT="$W" TAIL=40 step check_gpu_block 110 python -m bench.check_gpu --shapes 32/8/128 --seqlens 4096,32768 --bwd-seqlens 4096 --backends triton --orders block --extend 512
TAIL=60 step profile_block_main 40 python -m bench.profile_sparse --orders block,token --top 8
(cd .bench_base && TAIL=20 step profile_block_base 30 python -m bench.profile_sparse --orders block --top 8)
TAIL=30 step kernels_main 70 python -m bench.bench_kernels --ops sparse --shapes 32/8/128,64/4/128 --seqlens 8192,32768 --selections random,tile --backends triton --no-check --budget-s 55 --out "$W/main"
TAIL=40 step bench_e2e_best 290 python -m bench.bench_e2e --sections best --seqlens 8k,32k,128k --budget-s 260 --out "$W/e2e"
tar -C "$OUT" -czf "$OUT/session.tar.gz" s && rm -rf "$W"
