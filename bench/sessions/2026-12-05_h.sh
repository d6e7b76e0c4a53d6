#!/usr/bin/env bash
# For the next device session (one call, <= 600 s), left by the third session of 2026-12-05: the end-to-end forward
# with the sparse layers on tile-correlated selections (issue 22 item 1: the locality of a trained model's,
# bench/inject.py), what is live at the peak of `torch.compile(compiled)`'s forward (134 KB more per token than eager
# at every length), decode on the H100 (item 6: last measured on an H200, 2026-11-30) and the extend grid's full
# sample on a GPU (never run there). Ran as the fourth session's first device call (18:45-18:51 UTC, 361 s); results
# bench/results/h100_2026-12-05h_*.
BUDGET_S=${BUDGET_S:-560}; . "$(dirname "$0")/steps.sh"; mkdir -p "$W"
mkdir -p "$W/e2e_tile"
TAIL=30 step bench_e2e_best_tile 230 python -m bench.bench_e2e --sections best --seqlens 32k,128k --selections tile --budget-s 200 --out "$W/e2e_tile"
TAIL=40 step memory_peak_32k 100 python -m bench.memory_peak --seqlen 32k --modes eager,compile
OUT="$W" TAIL=40 step bench_decode 150 python -m bench.bench_decode --budget-s 110 --skip-memory
TAIL=40 step profile_decode 50 python -m bench.profile_decode --context 131072 --batch 8
TAIL=15 step grid_extend_full 60 python -m pytest -q -p no:cacheprovider tests/kernels/test_grid_extend.py --full
tar -C "$OUT" -czf "$OUT/session.tar.gz" s
