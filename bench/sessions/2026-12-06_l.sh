#!/usr/bin/env bash
# Call l of 2026-12-06 (ninth session): the full forward's off-diagonal loop is now one
# `tl.range(..., warp_specialize=WS)` instead of two copies (WS and plain); on Triton 3.9 (CPU, sm_90 target) the
# SASS of every variant is byte-identical before and after. Here, on Triton 3.6: the default (warp-specialized) and
# the same tiles without WS, checked and timed against cuDNN in one run (their ratios before: default 1.377x /
# 1.318x / 1.369x / 1.340x / 1.143x / 1.179x, call a of 2026-12-06).
BUDGET_S=${BUDGET_S:-300}; . "$(dirname "$0")/steps.sh"; mkdir -p "$W"
mkdir -p "$W/ffv"
TAIL=30 step full_fwd_variants 280 python -m bench.full_fwd_variants --seqlens 8192,32768,131072 --variants tma2d_acc_ws_128x64_w8_s3,tma2d_acc_128x64_w8_s3 --out "$W/ffv"
tar -C "$OUT" -czf "$OUT/session.tar.gz" s
