#!/usr/bin/env bash
# Call ab of 2026-12-06 (twelfth session): the block-major forward's token lists for every chunk of partials from one
# sort (a few small launches per call instead of ~30 per 1 GiB chunk: bench_kernels timed the op 0.9-1.3 ms above
# the sum of its kernels at 32k, calls y and aa). Checks at real sizes (32k: 5 chunks), then the op on this tree and
# on the one before it (.bench_base, `git archive b8eabfc hysparse_compile bench/*.py`) in the same call, the
# kernels at 128k (17 chunks) on both, and the model's 32k / 128k forward against the original at its best.
BUDGET_S=${BUDGET_S:-585}; . "$(dirname "$0")/steps.sh"; mkdir -p "$W"
OUT="$W" TAIL=4 step check_gpu 100 python -m bench.check_gpu --shapes 32/8/128 --seqlens 4096,32768 --bwd-seqlens 4096 --backends triton --orders block
KB="--ops sparse --shapes 32/8/128,64/4/128 --seqlens 32768 --selections random --backends triton --no-check --no-bwd --orders auto,block --budget-s 50"
mkdir -p "$W/new" "$W/base" "$W/new2"
OUT="$W/new" TAIL=12 step kernels_new 60 python -m bench.bench_kernels $KB
(cd .bench_base && OUT="$W/base" TAIL=12 step kernels_base 60 env PYTHONPATH=. python -m bench.bench_kernels $KB)
OUT="$W/new2" TAIL=12 step kernels_new2 60 python -m bench.bench_kernels $KB
TAIL=22 step prof_new 45 python -m bench.profile_sparse --shape 32/8/128 --seqlen 131072 --orders block
(cd .bench_base && TAIL=22 step prof_base 45 env PYTHONPATH=. python -m bench.profile_sparse --shape 32/8/128 --seqlen 131072 --orders block)
mkdir -p "$W/e2e"
TAIL=14 step e2e 200 python -m bench.bench_e2e --sections best --seqlens 32k,128k --calls 5 --budget-s 190 --out "$W/e2e"
tar -C "$OUT" -czf "$OUT/session.tar.gz" s
