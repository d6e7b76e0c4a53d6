#!/usr/bin/env bash
# 2026-12-06, eighth session, device call 2 (results bench/results/h100_2026-12-06d_*): what is live at the peak of one
# training step at 8k, every block listed by phase, site and size (call c's run of this stopped at its 60 s limit while
# compiling; call b's took longer than that and its table stopped at 25 rows). The compiled model's fwd+bwd peak is
# 1.18x the original's under torch.compile (13.72 against 11.66 GiB); about 1.8 GiB of it has no known cause.
BUDGET_S=${BUDGET_S:-230}; . "$(dirname "$0")/steps.sh"; mkdir -p "$W"
TAIL=200 step memory_peak_8k 210 python -m bench.memory_peak --seqlen 8k --modes compile --model both --backward --top 3
tar -C "$OUT" -czf "$OUT/session.tar.gz" s
