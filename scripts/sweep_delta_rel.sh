#!/usr/bin/env bash
# Sweep delta_rel the way the paper's users do: datasets x LL schemes x delta_rel x seeds, one run folder each.
#
#   DATASETS="pascal coco" SCHEMES="LL-R LL-Ct LL-Cp" DELTAS="0.1 0.2 0.3 0.4 0.5" SEEDS="0 1 2" \
#     SAVE=results/sweep scripts/sweep_delta_rel.sh [extra main.py flags...]
#
# Every variable has that default (DATASETS: pascal). main.py refuses an extra flag that repeats one the script sets.
# Run folders are named <dataset>_<scheme>_d<delta>_s<seed> (AN, which has no rate: once per seed, <dataset>_AN_s<seed>);
# a finished one (final.json present) is skipped and an unfinished one resumes from its last checkpoint, so
# re-running the same command completes an interrupted sweep.
# Then: python report.py "$SAVE" --out "$SAVE/report"
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
SAVE=${SAVE:-results/sweep}
for dataset in ${DATASETS:-pascal}; do
  for scheme in ${SCHEMES:-LL-R LL-Ct LL-Cp}; do
    deltas=${DELTAS:-0.1 0.2 0.3 0.4 0.5}
    [ "$scheme" != AN ] || deltas=none  # AN has no rate: one run per seed, without --delta_rel
    for delta in $deltas; do
      for seed in ${SEEDS:-0 1 2}; do
        if [ "$delta" = none ]; then name="${dataset}_${scheme}_s${seed}"; rate=(); else
          name="${dataset}_${scheme}_d${delta}_s${seed}"; rate=(--delta_rel "$delta"); fi
        if [ -f "$SAVE/$name/final.json" ]; then echo "skip $name (finished)"; continue; fi
        echo "run  $name"  # an unfinished run resumes from its last checkpoint
        $PY main.py --dataset "$dataset" --mod_scheme "$scheme" ${rate[@]+"${rate[@]}"} --seed "$seed" \
          --save_path "$SAVE" --exp_name "$name" "$@"
      done
    done
  done
done
