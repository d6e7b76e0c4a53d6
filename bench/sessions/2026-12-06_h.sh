#!/usr/bin/env bash
# For the next device session (one call, ~570 s), left by the eighth session of 2026-12-06 (device time ran out after
# call g). Call g found torch 2.11's Dynamo answering torch.compiler.is_exporting() with True under torch.compile, so
# the gates never took graph_ops.gate_sigmoid on the GPU (Inductor kept the gate projection's output beside the
# gates: 10 [T, 2·Hq·d] blocks for 5 sparse layers at the training peak in call f); graph_ops.exporting() now reads
# the flag torch.export sets. First a probe of that on torch 2.11 (gate_sigmoid under torch.compile, plain sigmoid
# under torch.export, strict and non-strict; tests/passes/test_graph_ops.py imitates 2.11 on the CPU). Then the
# fwd+bwd rows (time and peak) on this tree, with Inductor's peak-memory reordering on (the default, which puts every
# weight gradient after the last attention backward: call e) and off (call f: peak 13.41 against 13.93 GiB).
# The review after the last call also moved the sparse kernels' strided offsets into one helper
# (sparse_attention.row_offsets) and gave extend its out strides: check_gpu on the model's layouts first.
# Ran as call h of 2026-12-06 (ninth session).
BUDGET_S=${BUDGET_S:-570}; . "$(dirname "$0")/steps.sh"; mkdir -p "$W"
mkdir -p "$W/check_hf" "$W/e2e_fwdbwd" "$W/e2e_fwdbwd_reorder_off"
OUT="$W/check_hf" TAIL=4 step check_gpu_hf 70 python -m bench.check_gpu --shapes 32/8/128 --seqlens 4096 --bwd-seqlens 4096 --backends triton --layout hf --extend 512
TAIL=8 step gate_probe 60 python -m bench.gate_probe
TAIL=12 step e2e_fwdbwd 215 python -m bench.bench_e2e --sections best_fwdbwd --seqlens 8k,32k --calls 5 --budget-s 205 --out "$W/e2e_fwdbwd"
TAIL=12 step e2e_fwdbwd_reorder_off 215 python -m bench.bench_e2e --sections best_fwdbwd --seqlens 8k,32k --calls 5 --budget-s 205 --inductor reorder_for_peak_memory=False --out "$W/e2e_fwdbwd_reorder_off"
tar -C "$OUT" -czf "$OUT/session.tar.gz" s
