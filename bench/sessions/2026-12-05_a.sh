#!/usr/bin/env bash
# GPU session 2026-12-05 (a), one device call of <= 600 s, steps in order of need:
#   issue 19's check: check_gpu on the final kernels, and the kernel times of this tree against 8c69ec0 (the tree
#   before issue 19) on the same machine; issue 22 item 5: the Triton extend kernels checked and timed; then, in the
#   time left, issue 22 item 1's fwd+bwd rows against the original at its best.
# Run from the repo root on the device with the base tree carried as .bench_base (`git archive 8c69ec0`).
# Steps: bench/sessions/steps.sh; logs and JSON go to $OUT/s/, one tarball comes back.
BUDGET_S=${BUDGET_S:-560}; . "$(dirname "$0")/steps.sh"; mkdir -p "$W/main" "$W/base" "$W/e2e"
OUT="$W" TAIL=12 step check_gpu 180 python -m bench.check_gpu --shapes 32/8/128 --seqlens 4096,32768 --bwd-seqlens 4096 --extend 512
OUT="$W" TAIL=30 step bench_extend 80 python -m bench.bench_extend --shapes 32/8/128 --rs 8,64,512
KB="--ops full,sparse --shapes 32/8/128 --seqlens 32768 --selections random,tile --backends triton --no-check --budget-s 40"
TAIL=30 step kernels_main 75 python -m bench.bench_kernels $KB --out "$W/main"
(cd .bench_base && TAIL=30 step kernels_base 75 env PYTHONPATH=. python bench/bench_kernels.py $KB --out "$W/base")
TAIL=40 step bench_e2e_best_fwdbwd 300 python -m bench.bench_e2e --sections best_fwdbwd --seqlens 8k,32k --calls 5 --budget-s 150 --out "$W/e2e"
tar -C "$OUT" -czf "$OUT/session_a.tar.gz" s && rm -rf "$W"
