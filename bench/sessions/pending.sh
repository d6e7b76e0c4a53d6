#!/usr/bin/env bash
# For the next device session (one call, ~560 s), left by the eighth session of 2026-12-06 (device time ran out after
# call g). Call g found torch 2.11's Dynamo answering torch.compiler.is_exporting() with True under torch.compile, so
# the gates never took graph_ops.gate_sigmoid on the GPU (Inductor kept the gate projection's output beside the
# gates: 10 [T, 2·Hq·d] blocks for 5 sparse layers at the training peak in call f); graph_ops.exporting() now reads
# the flag torch.export sets. First a probe of that on torch 2.11 (gate_sigmoid under torch.compile, plain sigmoid
# under torch.export, strict and non-strict; tests/passes/test_graph_ops.py imitates 2.11 on the CPU). Then the
# training peak and speed on this tree, with Inductor's peak-memory reordering on (the default, which puts every
# weight gradient after the last attention backward: call e) and off (call f: peak 13.41 against 13.93 GiB).
# Rename to <date>_<letter>.sh once run.
BUDGET_S=${BUDGET_S:-560}; . "$(dirname "$0")/steps.sh"; mkdir -p "$W"
mkdir -p "$W/e2e_fwdbwd" "$W/e2e_fwdbwd_reorder_off"
TAIL=20 step gate_probe 75 python -m bench.gate_probe
TAIL=5 step memory_peak_8k 110 python -m bench.memory_peak --seqlen 8k --modes compile --model compiled --backward --top 40
TAIL=5 step memory_peak_8k_reorder_off 110 python -m bench.memory_peak --seqlen 8k --modes compile --model compiled --backward --top 40 --inductor reorder_for_peak_memory=False
TAIL=12 step e2e_fwdbwd 200 python -m bench.bench_e2e --sections best_fwdbwd --seqlens 8k,32k --calls 5 --budget-s 190 --out "$W/e2e_fwdbwd"
TAIL=12 step e2e_fwdbwd_reorder_off 200 python -m bench.bench_e2e --sections best_fwdbwd --seqlens 8k,32k --calls 5 --budget-s 190 --inductor reorder_for_peak_memory=False --out "$W/e2e_fwdbwd_reorder_off"
tar -C "$OUT" -czf "$OUT/session.tar.gz" s
