#!/usr/bin/env bash
# Call aa of 2026-12-06 (twelfth session; the letters after z double): the sparse layer against FlexAttention on the
# same selections at 32k (SPEC §6: "faster than FlexAttention"; last timed on 2026-11-23 with the kernels of then),
# forward, both shapes, random and tile-correlated selections, with SDPA cuDNN and flash and Flex's dense causal
# attention as the dense baselines in the same run. (Flex's sparse backward did not compile at 32k on 2026-11-23.)
BUDGET_S=${BUDGET_S:-420}; . "$(dirname "$0")/steps.sh"; mkdir -p "$W"
mkdir -p "$W/kernels"
OUT="$W/kernels" TAIL=40 step kernels_flex 400 python -m bench.bench_kernels --ops sparse --shapes 32/8/128,64/4/128 --seqlens 32768 --selections random,tile --backends triton,flex --no-bwd --budget-s 380
tar -C "$OUT" -czf "$OUT/session.tar.gz" s
