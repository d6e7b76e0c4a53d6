#!/usr/bin/env bash
# 2026-12-06, eighth session, device call 3 (results bench/results/h100_2026-12-06e_*). The sparse layer's backward
# no longer copies or keeps what it does not need (call d's listing: at the training peak, 8k, one sparse layer's
# backward held dout's copy, the recomputed out and branch outputs, and the layout copies of every gradient beside the
# kernels' own): dout and the gate gradients through strides, dq/dK/dV and the forward's out written in their inputs'
# layouts, the recomputation's tensors freed after the preprocess. Checks first, on contiguous inputs and on the
# model's layout (--layout hf: transposed q/k/v/dout, the gates views of one projection); then the training peak with
# every block listed (Inductor's generated .py kept, to see what its backward holds across the sparse op), then the
# fwd+bwd and forward rows against the original at its best.
BUDGET_S=${BUDGET_S:-520}; . "$(dirname "$0")/steps.sh"; mkdir -p "$W"
mkdir -p "$W/check_contig" "$W/check_hf" "$W/e2e_fwdbwd" "$W/e2e_fwd"
OUT="$W/check_hf" TAIL=8 step check_gpu_hf 100 python -m bench.check_gpu --shapes 32/8/128,64/4/128 --seqlens 4096 --bwd-seqlens 4096 --backends triton --layout hf --extend 0
OUT="$W/check_contig" TAIL=8 step check_gpu 60 python -m bench.check_gpu --shapes 32/8/128 --seqlens 4096 --bwd-seqlens 4096 --backends triton --extend 0
TORCHINDUCTOR_CACHE_DIR="$W/inductor" TAIL=200 step memory_peak_8k 90 python -m bench.memory_peak --seqlen 8k --modes compile --model both --backward --top 3
(cd "$W/inductor" 2>/dev/null && find . -name '*.py' -size +20k | tar -czf "$W/inductor_py.tar.gz" -T -) ; rm -rf "$W/inductor"
TAIL=14 step e2e_fwdbwd 170 python -m bench.bench_e2e --sections best_fwdbwd --seqlens 8k,32k --calls 5 --budget-s 150 --out "$W/e2e_fwdbwd"
TAIL=14 step e2e_fwd 100 python -m bench.bench_e2e --sections best --seqlens 8k,32k --calls 5 --budget-s 85 --out "$W/e2e_fwd"
tar -C "$OUT" -czf "$OUT/session.tar.gz" s
