#!/usr/bin/env bash
# 2026-12-05, third session, device call 2 (issue 22 item 2): the block-major forward with the FlashAttention-3-style
# combine kernel (block_major.combine_partials) and streaming partial stores, against the tree before it (37a62b9,
# carried as .bench_base); knob variants of the partials and merge kernels; check_gpu on the changed kernels (the
# combine, the merge kernel reading one slot, the token-major and extend kernels' shared union walk); kernel rows.
BUDGET_S=${BUDGET_S:-570}; . "$(dirname "$0")/steps.sh"; mkdir -p "$W/main"
V='[{}, {"block_major": {"num_stages": 3}}, {"block_major": {"tok": 32}}, {"block_major": {"chunk": 1024}}, {"num_warps": 4}, {"num_warps": 4, "num_stages": 3}]'
TAIL=80 step profile_block_main 100 python -m bench.profile_sparse --orders block --variants "$V" --top 6
TAIL=20 step profile_block_main_64_4 40 python -m bench.profile_sparse --shape 64/4/128 --orders block --top 6
(cd .bench_base && TAIL=20 step profile_block_base 40 python -m bench.profile_sparse --orders block)
OUT="$W" TAIL=12 step check_gpu 190 python -m bench.check_gpu --shapes 32/8/128 --seqlens 4096,32768 --bwd-seqlens 4096 --extend 512
TAIL=30 step kernels_main 90 python -m bench.bench_kernels --ops sparse --shapes 32/8/128,64/4/128 --seqlens 32768 --selections random,tile --backends triton --no-check --budget-s 75 --out "$W/main"
tar -C "$OUT" -czf "$OUT/session.tar.gz" s && rm -rf "$W"
