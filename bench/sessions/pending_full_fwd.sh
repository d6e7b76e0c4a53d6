#!/usr/bin/env bash
# For a device session (one call, <= 600 s), left by the fifth session of 2026-12-05 (no GPU lent), beside
# pending.sh: (1) the full layer's forward variants (K/V through tensor descriptors, the accumulate-form P @ V,
# tiles), checked against the reference and timed against SDPA cuDNN at 8k / 32k; (2) the block-major sparse forward
# with the fused combine (the last kernel folds the partials; SWA as the last split) against the separate combine
# kernel, per kernel, both shapes, with their outputs compared; (3) the token-major sparse forward with K/V blocks
# through tensor descriptors (tile-correlated selections at G = 4, random at G = 16: where token-major runs).
# Then pending_variants_check.sh (FULL_FWD = the fastest variant found here): check_gpu with the variants, decode's
# +inductor rows (they failed in call h, fixed since) and the model's forward with them. Defaults change only where
# the model's rows move. Rename to <date>_<letter>.sh once run.
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
echo "fastest full-forward variant: ${best:-none} (pass it as FULL_FWD to pending_variants_check.sh)"
tar -C "$OUT" -czf "$OUT/session.tar.gz" s
