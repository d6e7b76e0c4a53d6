#!/usr/bin/env bash
# For the next device session (one call, ~180 s), left by the sixth session of 2026-12-05 (its device time ran out):
# the full layer's extend on its pointer tiles (what it runs: full_attention_extend.EXTEND_DESCRIPTORS is off) and on
# the forward's descriptor tiles (128 rows, K/V through tensor descriptors, the prefill default since 2026-12-06;
# check_gpu passed their extend rows at R = 512 in calls o and p, R = 8 / 64 never ran on them). Turn
# EXTEND_DESCRIPTORS on only if its rows are faster at every R.
# Rename to <date>_<letter>.sh once run.
BUDGET_S=${BUDGET_S:-180}; . "$(dirname "$0")/steps.sh"; mkdir -p "$W"
OUT="$W" TAIL=28 step bench_extend_triton 80 python -m bench.bench_extend --shapes 32/8/128,64/4/128 --rs 8,64,512 --backends reference,triton
mv "$W/bench_extend.json" "$W/bench_extend_pointer.json" 2>/dev/null
OUT="$W" TAIL=28 step bench_extend_descriptors 80 python -m bench.bench_extend --shapes 32/8/128,64/4/128 --rs 8,64,512 --backends reference,triton --descriptors
tar -C "$OUT" -czf "$OUT/session.tar.gz" s
