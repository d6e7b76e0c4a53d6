#!/usr/bin/env bash
# Call z of 2026-12-06 (twelfth session): rows with real selections (issue #22 item 1) on the current kernels. The
# sparse layer's kernels at 4k on what the paper miniature's trained full layers selected (its selections.npz: 4096
# tokens, top-k 512) against random and tile-correlated selections, both orders; then the model's forward at 4k
# with top-k 512 against the original at its best on its own selections, the trained ones, random and tile.
BUDGET_S=${BUDGET_S:-560}; . "$(dirname "$0")/steps.sh"; mkdir -p "$W"
tar -xzf bench/results/h200_2026-11-30_paper_miniature.tar.gz -C /tmp selections.npz || echo "no selections.npz"
mkdir -p "$W/kernels"
OUT="$W/kernels" TAIL=30 step kernels_trained 120 python -m bench.bench_kernels --ops sparse --backends triton --seqlens 4096 --topk 512 --selections random,tile,trained --trained /tmp/selections.npz --orders token,block --budget-s 100
for sel in model trained random tile; do
  mkdir -p "$W/e2e_4k_$sel"; s=$sel; [ "$sel" = trained ] && s=/tmp/selections.npz
  TAIL=10 step "e2e_4k_$sel" 100 python -m bench.bench_e2e --sections best --seqlens 4k --topk 512 --calls 5 --selections "$s" --budget-s 90 --out "$W/e2e_4k_$sel"
done
tar -C "$OUT" -czf "$OUT/session.tar.gz" s
