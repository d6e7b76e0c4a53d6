#!/usr/bin/env bash
# 2026-12-06, eighth session, device call 5 (results bench/results/h100_2026-12-06g_*). Call f (Inductor's peak-memory
# reordering off) left 10 [T, 2·Hq·d] blocks live at the peak for 5 sparse layers, and call e's forward code shows
# `aten.sigmoid` where graph_ops.branch_gates should put hysparse::gate_sigmoid under torch.compile with grad (torch
# 2.13 on the CPU does). Which of branch_gates' conditions does torch 2.11 see differently? A probe: the flags inside
# a compiled function, and whether gate_sigmoid reaches Inductor's code, for branch_gates alone and for a 4-layer
# compiled model.
BUDGET_S=${BUDGET_S:-100}; . "$(dirname "$0")/steps.sh"; mkdir -p "$W"
# As run, this step was the probe inline (the flags, branch_gates alone, the 4-layer model); it is now
# bench/gate_probe.py, which also checks torch.export.
TAIL=20 step gate_probe 90 python -m bench.gate_probe
tar -C "$OUT" -czf "$OUT/session.tar.gz" s
