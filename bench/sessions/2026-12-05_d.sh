#!/usr/bin/env bash
# 2026-12-05, third session, device call 1: where the block-major sparse forward's time goes (issue 22 item 2),
# then what pending.sh held: the compiled model's 32k fwd+bwd rows against the original at its best (item 1) and
# the G = 16 shape's gradients, decode and extend on the landed kernels.
BUDGET_S=${BUDGET_S:-570}; . "$(dirname "$0")/steps.sh"; mkdir -p "$W/e2e"
TAIL=60 step profile_sparse_32_8 60 python -m bench.profile_sparse --shape 32/8/128 --seqlen 32768 --orders block,token
TAIL=40 step profile_sparse_64_4 40 python -m bench.profile_sparse --shape 64/4/128 --seqlen 32768 --orders block
TAIL=30 step bench_e2e_best_fwdbwd_32k 300 python -m bench.bench_e2e --sections best_fwdbwd --seqlens 32k --calls 5 --budget-s 250 --out "$W/e2e"
OUT="$W" TAIL=10 step check_gpu_g16 200 python -m bench.check_gpu --shapes 64/4/128 --seqlens 8192 --bwd-seqlens 4096 --extend 512
tar -C "$OUT" -czf "$OUT/session.tar.gz" s && rm -rf "$W"
