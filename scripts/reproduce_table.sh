#!/usr/bin/env bash
# Every row of the paper's table on one dataset, on one protocol, with the presets (the authors' published settings):
# full labels, AN, WAN, LSAN, EPR, ROLE, EM, EM+APL, LL-R, LL-Ct, LL-Cp, and LL-R/Ct/Cp + BoostLU (alpha 5).
#
#   scripts/reproduce_table.sh DATASET [SEEDS...]            e.g. scripts/reproduce_table.sh coco 0 1 2
#   TRAIN_MODE=linear_init scripts/reproduce_table.sh DATASET  the LinearInit table (no BoostLU rows)
#   SAVE=... METHODS="AN LL-R" ...                            another folder, or a subset of the rows
#
# Extra main.py flags go in EXTRA (e.g. EXTRA="--num_workers 8"). Finished runs are skipped, unfinished ones resume.
# Then:
#   python report.py "$SAVE" --out "$SAVE/report"
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
dataset=${1:?usage: scripts/reproduce_table.sh DATASET [SEEDS...]}
shift
seeds=("$@")
[ ${#seeds[@]} -gt 0 ] || seeds=(0)
mode=${TRAIN_MODE:-end_to_end}
SAVE=${SAVE:-results/table_${dataset}}
declare -A flags=(
  [full]="--train_set_variant clean" [AN]="--mod_scheme AN" [wan]="--loss wan" [lsan]="--loss lsan"
  [epr]="--loss epr" [role]="--loss role" [em]="--loss em" [em_apl]="--loss em_apl"
  [LL-R]="--mod_scheme LL-R" [LL-Ct]="--mod_scheme LL-Ct" [LL-Cp]="--mod_scheme LL-Cp"
  [LL-R+BoostLU]="--mod_scheme LL-R --boostlu_alpha 5" [LL-Ct+BoostLU]="--mod_scheme LL-Ct --boostlu_alpha 5"
  [LL-Cp+BoostLU]="--mod_scheme LL-Cp --boostlu_alpha 5"
)
default_methods="full AN wan lsan epr role em em_apl LL-R LL-Ct LL-Cp"
[ "$mode" = linear_init ] || default_methods+=" LL-R+BoostLU LL-Ct+BoostLU LL-Cp+BoostLU"
[ "$dataset" != openimages ] || default_methods="AN wan lsan LL-R LL-Ct LL-Cp"
for seed in "${seeds[@]}"; do
  for method in ${METHODS:-$default_methods}; do
    name="${dataset}_${method}_${mode}_s${seed}"
    if [ -f "$SAVE/$name/final.json" ]; then echo "skip $name (finished)"; continue; fi
    echo "run  $name"  # an unfinished run resumes from its last checkpoint
    # shellcheck disable=SC2086
    $PY main.py --dataset "$dataset" --train_mode "$mode" --seed "$seed" --save_path "$SAVE" --exp_name "$name" \
      ${flags[$method]} ${EXTRA:-}
  done
done
