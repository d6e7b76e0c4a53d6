#!/usr/bin/env bash
# For the next device session (one call, <= 600 s), left by the third session of 2026-12-05: what is live at the
# peak of `torch.compile(compiled)`'s forward (134 KB more per token than eager at every length), decode on the H100
# (issue 22 item 6: last measured on an H200, 2026-11-30) and the extend grid's full sample on a GPU (never run
# there). Rename to <date>_<letter>.sh once run.
BUDGET_S=${BUDGET_S:-560}; . "$(dirname "$0")/steps.sh"; mkdir -p "$W"
TAIL=40 step memory_peak_32k 120 python -m bench.memory_peak --seqlen 32k --modes eager,compile
OUT="$W" TAIL=40 step bench_decode 200 python -m bench.bench_decode --budget-s 150 --skip-memory
TAIL=40 step profile_decode 60 python -m bench.profile_decode --context 131072 --batch 8
TAIL=15 step grid_extend_full 150 python -m pytest -q -p no:cacheprovider tests/kernels/test_grid_extend.py --full
tar -C "$OUT" -czf "$OUT/session.tar.gz" s
