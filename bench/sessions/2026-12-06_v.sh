#!/usr/bin/env bash
# Call v of 2026-12-06 (eleventh session): the token-major union walk without the causal mask on the blocks that
# end before the tile (and the 2-D descriptors' V mask only on a block that can run past T), the scale inside the
# exp2, the block-major partials normalized before P V. Checks at real sizes, then the kernels (profile) on this
# tree, with the 2-D descriptors and a register cap as variants, and the same profiles on the kernels of cdf97db
# (copied in for the second half; before running, put them in place:
#   for f in sparse_attention sparse_attention_extend block_major; do
#     git show cdf97db:hysparse_compile/kernels/triton/$f.py > bench/sessions/old_$f.py; done).
# Ran 13:27 UTC on an H100 (176 s); results bench/results/h100_2026-12-06v_*. The token-major change it timed was
# slower and is not in the tree (docs/kernels_sparse.md, "Integer work per step").
BUDGET_S=${BUDGET_S:-570}; . "$(dirname "$0")/steps.sh"; mkdir -p "$W"
OUT="$W" TAIL=6 step check_gpu 170 python -m bench.check_gpu --shapes 32/8/128 --seqlens 4096,32768 --bwd-seqlens 4096 --backends triton --orders token,block --extend 512
mv "$W/check_gpu.json" "$W/check_gpu_main.json" 2>/dev/null
OUT="$W" TAIL=6 step check_gpu_hf 90 python -m bench.check_gpu --shapes 64/4/128 --seqlens 4096 --bwd-seqlens 4096 --backends triton --layout hf --extend 512
mv "$W/check_gpu.json" "$W/check_gpu_hf.json" 2>/dev/null
OUT="$W" TAIL=6 step check_gpu_2d 60 python -m bench.check_gpu --shapes 32/8/128 --seqlens 4096 --bwd-seqlens 0 --backends triton --layout hf --token-tma 2d --orders token
mv "$W/check_gpu.json" "$W/check_gpu_2d.json" 2>/dev/null
for tree in new old; do
  if [ "$tree" = old ]; then
    for f in sparse_attention sparse_attention_extend block_major; do cp bench/sessions/old_$f.py hysparse_compile/kernels/triton/$f.py; done
    V2='[{}]'; VB='[{}]'
  else
    V2='[{}, {"tma": "2d"}]'; VB='[{}, {"block_major": {"maxnreg": 168}}]'
  fi
  TAIL=30 step prof_tile_32k_$tree 50 python -m bench.profile_sparse --shape 32/8/128 --seqlen 32768 --selection tile --orders token --variants "$V2"
  TAIL=30 step prof_g16_32k_$tree 50 python -m bench.profile_sparse --shape 64/4/128 --seqlen 32768 --orders token --variants "$V2"
  TAIL=30 step prof_rand_8k_$tree 40 python -m bench.profile_sparse --shape 32/8/128 --seqlen 8192 --orders token --variants "$V2"
  TAIL=30 step prof_rand_32k_$tree 50 python -m bench.profile_sparse --shape 32/8/128 --seqlen 32768 --orders block --variants "$VB"
  TAIL=30 step prof_rand_128k_$tree 60 python -m bench.profile_sparse --shape 32/8/128 --seqlen 131072 --orders block --variants "$VB"
done
tar -C "$OUT" -czf "$OUT/session.tar.gz" s
