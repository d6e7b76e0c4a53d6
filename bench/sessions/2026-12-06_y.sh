#!/usr/bin/env bash
# Run in the twelfth session (2026-12-06), pending from the eleventh (its device time ran out): the rows its kernels changed but it did
# not rerun. The sparse layer's kernel rows with the partials kernel's register cap (G = 4 and G = 16, random and
# tile-correlated, fwd, fwd+bwd and fwd+bwd with the model's recomputation; the G = 4 random one is a SPEC §6 target
# row, 1.98x before the cap), then the model's forward on tile-correlated selections at 32k and 128k (1.07x / 1.57x
# were measured before these kernels). Rename it to bench/sessions/<date>_<letter>.sh when it runs.
BUDGET_S=${BUDGET_S:-580}; . "$(dirname "$0")/steps.sh"; mkdir -p "$W"
mkdir -p "$W/kernels" "$W/e2e_tile"
OUT="$W/kernels" TAIL=30 step kernels 200 python -m bench.bench_kernels --ops sparse --shapes 32/8/128,64/4/128 --seqlens 32768 --selections random,tile --backends triton --no-check --recompute --budget-s 185
TAIL=14 step e2e_tile 330 python -m bench.bench_e2e --sections best --seqlens 32k,128k --selections tile --calls 5 --budget-s 310 --out "$W/e2e_tile"
tar -C "$OUT" -czf "$OUT/session.tar.gz" s
