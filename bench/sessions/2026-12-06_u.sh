#!/usr/bin/env bash
# Call u of 2026-12-06 (eleventh session): the block-major kernels with less integer work per step (nsel a
# constexpr, int32 offsets, the forward's partials unmasked past the diagonal): checks at real sizes on this tree,
# then the sparse layer's kernels (profile) and its fwd / fwd+bwd rows on this tree and, in the same call, on the
# block_major.py before the change, copied in for the second half. Before running it, put that file in place:
#   git show 6779a96:hysparse_compile/kernels/triton/block_major.py > bench/sessions/old_block_major.py
# Ran 13:20 UTC on an H100 (149 s); results bench/results/h100_2026-12-06u_*.
BUDGET_S=${BUDGET_S:-570}; . "$(dirname "$0")/steps.sh"; mkdir -p "$W"
OUT="$W" TAIL=12 step check_gpu 150 python -m bench.check_gpu --shapes 32/8/128 --seqlens 4096,32768 --bwd-seqlens 4096 --backends triton --orders block
mv "$W/check_gpu.json" "$W/check_gpu_block.json" 2>/dev/null
OUT="$W" TAIL=12 step check_gpu_hf 100 python -m bench.check_gpu --shapes 32/8/128,64/4/128 --seqlens 4096 --bwd-seqlens 4096 --backends triton --orders block --layout hf
mv "$W/check_gpu.json" "$W/check_gpu_hf.json" 2>/dev/null
for tree in new old; do
  if [ "$tree" = old ]; then cp bench/sessions/old_block_major.py hysparse_compile/kernels/triton/block_major.py; fi
  TAIL=14 step profile_32_8_32k_$tree 60 python -m bench.profile_sparse --shape 32/8/128 --seqlen 32768 --orders block
  TAIL=14 step profile_32_8_128k_$tree 60 python -m bench.profile_sparse --shape 32/8/128 --seqlen 131072 --orders block
  TAIL=14 step profile_64_4_32k_$tree 50 python -m bench.profile_sparse --shape 64/4/128 --seqlen 32768 --orders block
  mkdir -p "$W/kernels_$tree"
  OUT="$W/kernels_$tree" TAIL=20 step kernels_$tree 100 python -m bench.bench_kernels --ops sparse --shapes 32/8/128 --seqlens 8192,32768 --selections random,tile --backends triton --no-check --recompute --budget-s 85
done
tar -C "$OUT" -czf "$OUT/session.tar.gz" s
