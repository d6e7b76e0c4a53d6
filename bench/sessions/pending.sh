#!/usr/bin/env bash
# The runs the last GPU session (2026-12-05) could not make, for the next one (one device call, <= 600 s):
# the compiled model's 32k fwd+bwd rows against the original at its best (issue 22 item 1; the original's rows ran,
# eager 1076.8 ms and compile[layers] 939.9 ms, then the call's time limit came), and the G = 16 shape's gradients
# and decode on the landed kernels (only its forward ran). Rename to <date>_<letter>.sh once run.
BUDGET_S=${BUDGET_S:-560}; . "$(dirname "$0")/steps.sh"; mkdir -p "$W/e2e"
TAIL=30 step bench_e2e_best_fwdbwd_32k 330 python -m bench.bench_e2e --sections best_fwdbwd --seqlens 32k --calls 5 --budget-s 280 --out "$W/e2e"
OUT="$W" TAIL=10 step check_gpu_g16 220 python -m bench.check_gpu --shapes 64/4/128 --seqlens 8192 --bwd-seqlens 4096 --extend 512
tar -C "$OUT" -czf "$OUT/session.tar.gz" s && rm -rf "$W"
