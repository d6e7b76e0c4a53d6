#!/usr/bin/env bash
# 2026-12-06, eighth session, device call 4 (results bench/results/h100_2026-12-06f_*). Call e's Inductor code showed
# torch 2.11's backward of the whole compiled model (one graph) computing all 62 weight gradients after the last
# attention backward, so each layer's output gradients (the logits' 500 MiB among them) live through the whole
# backward; torch 2.13's Inductor on the CPU interleaves them (58 of 62 before). Is Inductor's peak-memory reordering
# the cause? The training step's peak at 8k with it off (call e: on, the default, this tree), the generated backward
# kept. CONFIGS="a=b c=d" runs others.
BUDGET_S=${BUDGET_S:-150}; . "$(dirname "$0")/steps.sh"; mkdir -p "$W"
for cfg in ${CONFIGS:-reorder_for_peak_memory=False}; do
  n=${cfg%%=*}
  TORCHINDUCTOR_CACHE_DIR="$W/ind_$n" TAIL=4 step memory_peak_$n 110 python -m bench.memory_peak --seqlen 8k --modes compile --model compiled --backward --top 40 --inductor $cfg
  (cd "$W/ind_$n" 2>/dev/null && grep -l tangents_1 $(find . -name '*.py' -size +100k) | tar -czf "$W/inductor_bwd_$n.tar.gz" -T -); rm -rf "$W/ind_$n"
done
tar -C "$OUT" -czf "$OUT/session.tar.gz" s
