#!/usr/bin/env bash
# 2026-12-05, third session, device call 4 (the last ~5 device minutes): the combine kernel at G = 16 (block order
# forced, 64/4/128 at 4k: two 8-head programs per token); flex's main kernel forced for a short prefill with more
# than 64 packed rows (T = 100, G = 16) and for extend at R = 8, G = 16 (128 packed rows), never run on a GPU;
# knob variants of the partials kernel for the next session; the extend grid's full sample on the GPU.
BUDGET_S=${BUDGET_S:-235}; . "$(dirname "$0")/steps.sh"; mkdir -p "$W"
OUT="$W" TAIL=20 step check_gpu_g16_block 130 python -m bench.check_gpu --shapes 64/4/128 --seqlens 100,4096 --bwd-seqlens 0 --backends triton,flex --orders block --extend 8
TAIL=30 step profile_variants 35 python -m bench.profile_sparse --orders block --top 3 --variants '[{"block_major": {"num_stages": 4}}, {"block_major": {"tok": 8}}]'
TAIL=15 step grid_extend_full 60 python -m pytest -q -p no:cacheprovider tests/kernels/test_grid_extend.py --full -x
tar -C "$OUT" -czf "$OUT/session.tar.gz" s
