#!/usr/bin/env bash
# 2026-12-06, seventh session, device call 1 (results bench/results/h100_2026-12-06a_*): check_gpu on the code as the
# sixth session left it (not rerun after its call p: the pointer-tile fallback, extend back on pointer tiles), both
# shapes, then softcap + full-layer sinks; then the sixth session's pending script: the full layer's extend on its
# pointer tiles (what it runs: full_attention_extend.EXTEND_DESCRIPTORS is off) and on the forward's descriptor tiles;
# turn EXTEND_DESCRIPTORS on only if its rows are faster at every R. Then the tiles around the new defaults: the full
# forward's pipeline depth, 4-D descriptors with the warp-specialized loop, the plain P @ V (bench.full_fwd_variants,
# 8k / 32k / 128k), and the token-major sparse forward's stages / warps / rows per tile with descriptor loads (they
# were tuned for pointer loads), on tile-correlated selections at G = 4 and random ones at G = 16.
BUDGET_S=${BUDGET_S:-585}; . "$(dirname "$0")/steps.sh"; mkdir -p "$W"
OUT="$W" TAIL=6 step check_gpu 70 python -m bench.check_gpu --shapes 32/8/128,64/4/128 --seqlens 4096 --bwd-seqlens 4096 --backends triton
mv "$W/check_gpu.json" "$W/check_gpu_main.json" 2>/dev/null
OUT="$W" TAIL=6 step check_gpu_cap 45 python -m bench.check_gpu --shapes 32/8/128 --seqlens 4096 --bwd-seqlens 4096 --backends triton --softcap 30 --full-sinks
OUT="$W" TAIL=28 step bench_extend_triton 80 python -m bench.bench_extend --shapes 32/8/128,64/4/128 --rs 8,64,512 --backends reference,triton
mv "$W/bench_extend.json" "$W/bench_extend_pointer.json" 2>/dev/null
OUT="$W" TAIL=28 step bench_extend_descriptors 80 python -m bench.bench_extend --shapes 32/8/128,64/4/128 --rs 8,64,512 --backends reference,triton --descriptors
mkdir -p "$W/ffv"
TAIL=30 step full_fwd_variants 200 python -m bench.full_fwd_variants --set-default --seqlens 8192,32768,131072 --variants ptr_64x64_w4_s3,tma2d_acc_ws_128x64_w8_s3,tma2d_acc_ws_128x64_w8_s2,tma2d_acc_ws_128x64_w8_s4,tma_acc_ws_128x64_w8_s3,tma2d_ws_128x64_w8_s3 --out "$W/ffv"
TV='[{}, {"num_stages": 2}, {"num_stages": 4}, {"num_warps": 8}, {"m_tok": "auto"}, {"tma": false}]'
TAIL=40 step profile_token_tile_32_8 60 python -m bench.profile_sparse --shape 32/8/128 --seqlen 32768 --selection tile --orders token --variants "$TV"
TAIL=40 step profile_token_64_4 60 python -m bench.profile_sparse --shape 64/4/128 --seqlen 32768 --orders token --variants "$TV"
tar -C "$OUT" -czf "$OUT/session.tar.gz" s
