#!/usr/bin/env bash
# The whole GPU plan of the paper miniature in one command, from the repository root:
#
#   bash examples/paper_miniature/run_all.sh                 # GPU: ~8 min on one H100/H200
#   SMOKE=1 bash examples/paper_miniature/run_all.sh         # CPU: toy sizes, every step of the plan, ~2 min
#
# Device tool: run(command="bash examples/paper_miniature/run_all.sh", carry=["examples/paper_miniature/data"])
# after `python examples/paper_miniature/prepare_data.py` here (the data folder is git-ignored, 52 MiB; without it
# the script prepares one from the GPU machine's own Python files, a different corpus).
#
# First check_kernels.py (Triton vs reference at the plan's shape, bf16; stops the plan on a mismatch). Then the
# plan (same steps, batch and context, so the same tokens, for every variant; same seed = same data and init):
#   1. full, swa-1:3, hysparse-1:3 (seed 0)   2. the same, seed 1   3. swa-1:7, hysparse-1:7
#   4. no-swa, kv-both, kv-none (1:3)
# A run starts only if it should end before TRAIN_DEADLINE_S (measured from the start, using the mean wall time of
# the runs so far), so evaluation always gets its turn inside the device tool's 10-minute limit; skipped runs are
# listed at the end. Decode speed is timed for the seed-0 runs of groups 1 and 3.
#
# Environment: STEPS (600), BATCH (4), CONTEXT (4096), NEEDLE_RATE (0.05), TRAIN_DEADLINE_S (400), DATA,
# RUNS (/tmp/pm_runs), OUT ($OUT from the device tool, else examples/paper_miniature/out), PYTHON (python3), SMOKE,
# PLAN, MERGE.
# Results: $OUT/results.json, results.md (the docs/fidelity.md tables), five PNGs, paper_miniature.tar.gz (logs,
# per-run config and metrics, selections.npz).
#
# A later batch of the same plan (the rest of it, or more runs) in one call: PLAN lists the runs, separated by ';',
# each "VARIANT SEED DECODE [train.py options]" (DECODE: `decode` times cached decoding, `-` skips it; the options
# come after the common ones, so they win), and MERGE names earlier results files to join (merge.py):
#
#   PLAN="no-swa 0 -;kv-both 0 -;kv-none 0 -;swa-1:7 1 -;hysparse-1:7 1 -" \
#   MERGE=bench/results/h200_2026-11-30_paper_miniature.json bash examples/paper_miniature/run_all.sh
#
# adds $OUT/merged.json and merged.md (every run of both, seed spreads recomputed) and the plots of the merged
# results. Runs with `--tag NAME` (e.g. a retrieval-heavy needle mix) are kept apart from the main tables.
set -euo pipefail
HERE=examples/paper_miniature
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
SMOKE=${SMOKE:-0}
if [ "$SMOKE" = 1 ]; then
  STEPS=${STEPS:-3}; DATA=${DATA:-/tmp/pm_smoke_data}; RUNS=${RUNS:-/tmp/pm_smoke_runs}
  TRAIN_DEADLINE_S=${TRAIN_DEADLINE_S:-600}; SIZE=(--smoke); EVAL=(--smoke); PREP=(--smoke)
else
  STEPS=${STEPS:-600}; DATA=${DATA:-$HERE/data}; RUNS=${RUNS:-/tmp/pm_runs}
  TRAIN_DEADLINE_S=${TRAIN_DEADLINE_S:-400}; SIZE=(--context "${CONTEXT:-4096}" --batch "${BATCH:-4}"); EVAL=(); PREP=()
fi
OUT=${OUT:-$HERE/out}
mkdir -p "$OUT"; OUT_ABS=$(cd "$OUT" && pwd)
LOGS="$RUNS/logs"
mkdir -p "$OUT" "$RUNS" "$LOGS"
$PY -c 'import torch; print("torch", torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())'

[ -f "$DATA/manifest.json" ] || $PY $HERE/prepare_data.py --out "$DATA" "${PREP[@]}"
if [ "$SMOKE" != 1 ]; then  # the kernels against the reference at the plan's shape, bf16: seconds, before minutes
  if ! $PY $HERE/check_kernels.py --context "${CONTEXT:-4096}"; then
    echo "check_kernels.py: the kernels disagree with the reference; stopping (FORCE=1 runs the plan anyway)"
    [ "${FORCE:-0}" = 1 ] || exit 1
  fi
fi

if [ -n "${PLAN:-}" ]; then
  IFS=';' read -r -a PLAN <<<"$PLAN"
else
  PLAN=("full 0 decode" "swa-1:3 0 decode" "hysparse-1:3 0 decode" "full 1 -" "swa-1:3 1 -" "hysparse-1:3 1 -"
        "swa-1:7 0 decode" "hysparse-1:7 0 decode" "no-swa 0 -" "kv-both 0 -" "kv-none 0 -")
fi
echo "plan: ${#PLAN[@]} runs: $(printf '%s; ' "${PLAN[@]}")"
# step: NAME LOG COMMAND...  runs a step, its output to LOG; prints the last lines; a failure is reported, not fatal
failed=()
step() {
  local name=$1 log=$2; shift 2
  if ! "$@" >"$log" 2>&1; then failed+=("$name"); echo "FAILED $name (log: $log)"; fi
  grep -v "━" "$log" | tail -n "${TAIL:-4}" | cut -c1-200
}
done_runs=0; run_time=0; skipped=()
for item in "${PLAN[@]}"; do
  read -r variant seed decode opts <<<"$item"
  [ -n "$variant" ] || continue
  read -r -a opts <<<"${opts:-}"
  tag=""; for ((i = 0; i + 1 < ${#opts[@]}; i++)); do [ "${opts[i]}" = --tag ] && tag="_${opts[i + 1]}"; done
  name="$variant/s$seed$tag"
  if [ "$done_runs" -gt 0 ]; then
    mean=$((run_time / done_runs))
    if [ $((SECONDS + mean)) -gt "$TRAIN_DEADLINE_S" ]; then
      skipped+=("$name")
      echo "SKIP $name: ${SECONDS}s + ~${mean}s > ${TRAIN_DEADLINE_S}s"
      continue
    fi
  fi
  extra=(); [ "$decode" = decode ] || extra=(--decode-new 0)
  start=$SECONDS
  echo "=== [$SECONDS s] train $variant seed $seed ${opts[*]:-}"
  step "$name" "$LOGS/${variant/:/_}_s$seed$tag.log" $PY $HERE/train.py --variant "$variant" --seed "$seed" \
      --steps "$STEPS" "${SIZE[@]}" --needle-rate "${NEEDLE_RATE:-0.05}" --data "$DATA" --out "$RUNS" "${extra[@]}" \
      "${opts[@]}"
  run_time=$((run_time + SECONDS - start)); done_runs=$((done_runs + 1))
done

echo "=== [$SECONDS s] evaluate"
step evaluate "$LOGS/evaluate.log" $PY $HERE/evaluate.py "$RUNS" --data "$DATA" --out "$OUT/results.json" \
    --markdown "$OUT/results.md" "${EVAL[@]}"
echo "=== [$SECONDS s] selections"
sel_runs=(); for r in hysparse-1_3_s0 full_s0; do [ -f "$RUNS/$r/model.pt" ] && sel_runs+=("$RUNS/$r"); done
[ ${#sel_runs[@]} -gt 0 ] && TAIL=12 step selections "$LOGS/selections.log" $PY $HERE/dump_selections.py \
    "${sel_runs[@]}" --data "$DATA" --out "$RUNS/selections.npz"
sel=(); [ -f "$RUNS/selections.npz" ] && sel=(--selections "$RUNS/selections.npz")
plotted="$OUT/results.json"
if [ -n "${MERGE:-}" ] && [ -f "$OUT/results.json" ]; then  # earlier batches + this one -> merged.json, merged.md
  echo "=== [$SECONDS s] merge with $MERGE"
  read -r -a merge_with <<<"$MERGE"
  TAIL=3 step merge "$LOGS/merge.log" $PY $HERE/merge.py "${merge_with[@]}" "$OUT/results.json" \
      --out "$OUT/merged.json" --markdown "$OUT/merged.md" "${sel[@]}"
  [ -f "$OUT/merged.json" ] && plotted="$OUT/merged.json"
fi
echo "=== [$SECONDS s] plot $plotted"
[ -f "$plotted" ] && TAIL=6 step plot "$LOGS/plot.log" $PY $HERE/plot.py "$plotted" --out "$RUNS/plots" "${sel[@]}"
cp "$RUNS"/plots/*.png "$OUT"/ 2>/dev/null || true
(cd "$RUNS" && tar -czf "$OUT_ABS/paper_miniature.tar.gz" logs $(ls -d plots */config.json */metrics.json \
    selections.npz 2>/dev/null)) || true
echo "=== [$SECONDS s] done: $done_runs runs; skipped: ${skipped[*]:-none}; failed: ${failed[*]:-none}"
if [ -f "$OUT/merged.md" ]; then cat "$OUT/merged.md"; elif [ -f "$OUT/results.md" ]; then cat "$OUT/results.md"; fi
[ ${#failed[@]} -eq 0 ]
