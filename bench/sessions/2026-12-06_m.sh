#!/usr/bin/env bash
# Call m of 2026-12-06 (ninth session): does the sparse forward's "auto" order cross over to block-major below 16k
# tokens on the H100? AUTO_MIN_T = 16384 came from the H200 (2026-11-30: block 0.4x vs token 0.6x cuDNN at 8k),
# before the token-major descriptor loads and the combine kernel. First the kernel rows at 8k and 16k, both orders,
# on random and on the full layer's own (random-weight) selections; then the model's 8k forward with "auto" as it is
# and with AUTO_MIN_T = 4096, each against the original at its best in its own run.
BUDGET_S=${BUDGET_S:-400}; . "$(dirname "$0")/steps.sh"; mkdir -p "$W"
mkdir -p "$W/kernels" "$W/e2e_auto" "$W/e2e_min4k"
TAIL=30 step kernels_8k_16k 120 python -m bench.bench_kernels --ops sparse --shapes 32/8/128 --seqlens 8192,16384 --selections random,real --orders token,block --backends triton --no-check --no-bwd --budget-s 100 --out "$W/kernels"
TAIL=10 step e2e_8k_auto 120 python -m bench.bench_e2e --sections best --seqlens 8k --calls 5 --budget-s 100 --out "$W/e2e_auto"
TAIL=10 step e2e_8k_min4k 120 python -c "import runpy, sys; import hysparse_compile.kernels.triton.sparse_attention as s; s.AUTO_MIN_T = 4096; sys.argv = ['bench_e2e', '--sections', 'best', '--seqlens', '8k', '--calls', '5', '--budget-s', '100', '--out', '$W/e2e_min4k']; runpy.run_module('bench.bench_e2e', run_name='__main__')"
tar -C "$OUT" -czf "$OUT/session.tar.gz" s
