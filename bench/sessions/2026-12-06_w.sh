#!/usr/bin/env bash
# Call w of 2026-12-06 (eleventh session): the model's rows on this tree (block-major kernels with less integer work,
# the partials kernel capped at 168 registers, token_lists' sort on int16 keys): a short check of the block order
# at 32k (forward; the backward rows need 4096 in --seqlens, so none ran), the sparse layer's kernels at 32k and
# 128k (and both orders at 8k), then the forward at 8k / 32k / 128k and fwd+bwd at 8k / 32k against the original
# at its best (median of 5 calls).
# Ran 14:14 UTC on an H100 (377 s); results bench/results/h100_2026-12-06w_*.
BUDGET_S=${BUDGET_S:-590}; . "$(dirname "$0")/steps.sh"; mkdir -p "$W"
OUT="$W" TAIL=4 step check_gpu 70 python -m bench.check_gpu --shapes 32/8/128 --seqlens 32768 --bwd-seqlens 4096 --backends triton --orders block
TAIL=20 step prof_rand_32k 40 python -m bench.profile_sparse --shape 32/8/128 --seqlen 32768 --orders block
TAIL=20 step prof_rand_8k 30 python -m bench.profile_sparse --shape 32/8/128 --seqlen 8192 --orders token,block
TAIL=20 step prof_rand_128k 40 python -m bench.profile_sparse --shape 32/8/128 --seqlen 131072 --orders block
mkdir -p "$W/e2e_fwd" "$W/e2e_fwdbwd"
TAIL=14 step e2e_fwd 240 python -m bench.bench_e2e --sections best --seqlens 8k,32k,128k --calls 5 --budget-s 225 --out "$W/e2e_fwd"
TAIL=12 step e2e_fwdbwd 230 python -m bench.bench_e2e --sections best_fwdbwd --seqlens 8k,32k --calls 5 --budget-s 215 --out "$W/e2e_fwdbwd"
tar -C "$OUT" -czf "$OUT/session.tar.gz" s
