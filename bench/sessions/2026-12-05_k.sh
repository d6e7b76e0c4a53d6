#!/usr/bin/env bash
# 2026-12-05, fourth session, device call 4 (19:09-19:12 UTC, 200 s; results bench/results/h100_2026-12-05k_*): the
# graph breaks of torch.compile(compiled) on the GPU's torch 2.11 (its Dynamo could not trace
# `torch.amp.is_autocast_available`, asked by every HySparse op's wrapper: a break per op; the wrapper no longer asks
# it while compiling); then the end-to-end rows against the original at its best again on this tree: forward at 8k /
# 32k, fwd+bwd at 32k; and what is live at the forward's peak under torch.compile.
BUDGET_S=${BUDGET_S:-470}; . "$(dirname "$0")/steps.sh"; mkdir -p "$W"
mkdir -p "$W/e2e_best" "$W/e2e_fwdbwd_32k"
TAIL=30 step graph_breaks 60 python -m bench.graph_breaks --seqlen 2048
TAIL=25 step bench_e2e_best 180 python -m bench.bench_e2e --sections best --seqlens 8k,32k --budget-s 160 --out "$W/e2e_best"
TAIL=25 step bench_e2e_fwdbwd_32k 150 python -m bench.bench_e2e --sections best_fwdbwd --seqlens 32k --calls 5 --budget-s 130 --out "$W/e2e_fwdbwd_32k"
TAIL=40 step memory_peak_32k 60 python -m bench.memory_peak --seqlen 32k --modes compile
tar -C "$OUT" -czf "$OUT/session.tar.gz" s
