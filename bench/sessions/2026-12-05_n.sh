#!/usr/bin/env bash
# 2026-12-05, sixth session, device call 2 (00:01-00:03 UTC, 134 s; results bench/results/h100_2026-12-05n_*),
# left by the fifth session as pending_full_fwd.sh: (1) the full layer's forward variants (K/V through tensor
# descriptors, the accumulate-form P @ V, tiles, the warp-specialized loop), checked against the reference and timed
# against SDPA cuDNN at 8k / 32k: tma2d_acc_ws_128x64_w8_s3 fastest, now FWD_CONFIG; (2) the block-major sparse
# forward with the fused combine against the separate combine kernel, per kernel, both shapes (0.1% / 3%: default
# kept); (3) the token-major sparse forward with K/V blocks through tensor descriptors (4-D 15-19% faster: now
# TOKEN_TMA; 2-D 13% slower).
BUDGET_S=${BUDGET_S:-570}; . "$(dirname "$0")/steps.sh"; mkdir -p "$W"
mkdir -p "$W/ffv"
TAIL=45 step full_fwd_variants 290 python -m bench.full_fwd_variants --set-default --out "$W/ffv"
V='[{}, {"block_major": {"combine": "fused"}}]'
TAIL=30 step profile_combine_32_8 50 python -m bench.profile_sparse --shape 32/8/128 --seqlen 32768 --orders block --variants "$V"
TAIL=30 step profile_combine_64_4 50 python -m bench.profile_sparse --shape 64/4/128 --seqlen 32768 --orders block --variants "$V"
TV='[{}, {"tma": true}, {"tma": "2d"}]'
TAIL=30 step profile_tma_tile_32_8 55 python -m bench.profile_sparse --shape 32/8/128 --seqlen 32768 --selection tile --orders token --variants "$TV"
TAIL=30 step profile_tma_64_4 55 python -m bench.profile_sparse --shape 64/4/128 --seqlen 32768 --orders token --variants "$TV"
best=$(python -c "import json; print(json.load(open('$W/ffv/full_fwd_variants.json'))['fastest']['variant'])" 2>/dev/null)
echo "fastest full-forward variant: ${best:-none} (pass it as FULL_FWD to 2026-12-05_o.sh)"
tar -C "$OUT" -czf "$OUT/session.tar.gz" s
