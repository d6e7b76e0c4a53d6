#!/usr/bin/env bash
# GPU session 2026-12-05 (c), after (a): the extend rows (a) did not reach (Triton at R = 512; Flex past R = 8, with
# flex's decoding kernel no longer chosen for many query rows), the G = 16 shape checked with softcap and full-layer
# sinks, the full-layer kernel times of both trees again, and the 32k fwd+bwd rows in the time left. Same layout as (a).
BUDGET_S=${BUDGET_S:-500}; . "$(dirname "$0")/steps.sh"; mkdir -p "$W/e2e" "$W/g16"
OUT="$W" TAIL=14 step bench_extend_triton 70 python -m bench.bench_extend --shapes 32/8/128,64/4/128 --rs 8,64,512 --backends reference,triton
mv "$W/bench_extend.json" "$W/bench_extend_triton.json" 2>/dev/null
OUT="$W" TAIL=14 step bench_extend_flex 110 python -m bench.bench_extend --shapes 32/8/128,64/4/128 --rs 8,64,512 --backends reference,flex
OUT="$W/g16" TAIL=10 step check_gpu_g16_cap 90 python -m bench.check_gpu --shapes 64/4/128 --seqlens 4096 --bwd-seqlens 4096 --softcap 30 --full-sinks --extend 256 --orders block
# the full layer's forward read 19.51 ms on this tree and 18.79 ms on 8c69ec0 in (a), its fwd+bwd 75.46 vs 75.29:
# both trees again, alternating, full layer only
KB="--ops full --shapes 32/8/128 --seqlens 8192,32768 --backends triton --no-check --budget-s 30"
for i in 1 2; do
  TAIL=6 step kernels_main_full_$i 45 python -m bench.bench_kernels $KB --out "$W/main$i"
  (cd .bench_base && TAIL=6 step kernels_base_full_$i 45 env PYTHONPATH=. python bench/bench_kernels.py $KB --out "$W/base$i")
done
TAIL=30 step bench_e2e_best_fwdbwd_32k 300 python -m bench.bench_e2e --sections best_fwdbwd --seqlens 32k --calls 5 --budget-s 240 --out "$W/e2e"
tar -C "$OUT" -czf "$OUT/session_c.tar.gz" s && rm -rf "$W"
