#!/usr/bin/env bash
# Call k of 2026-12-06 (ninth session): where the 128k forward's time goes (1.495x the original at its best in call
# i, target 1.5x). One forward of each model under the CUDA profiler (eager: the same kernels as under
# torch.compile, GEMM fusions aside), then the sparse layer's kernels at 128k per loop order, with the block-major
# partials capped at 1 GiB (default: 17 chunks at 128k, K/V re-read per chunk) and at 4 GiB.
BUDGET_S=${BUDGET_S:-280}; . "$(dirname "$0")/steps.sh"; mkdir -p "$W"
mkdir -p "$W/e2e_profile"
TAIL=60 step e2e_profile_128k 150 python -m bench.bench_e2e --sections "" --seqlens 128k --profile 131072 --out "$W/e2e_profile"
TAIL=40 step profile_sparse_128k 110 python -m bench.profile_sparse --shape 32/8/128 --seqlen 131072 --orders block,token --variants '[{}, {"block_major": {"max_partial_bytes": 4294967296}}]'
tar -C "$OUT" -czf "$OUT/session.tar.gz" s
