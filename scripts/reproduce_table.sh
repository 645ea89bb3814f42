#!/usr/bin/env bash
# Every row of the paper's table on one dataset, on one protocol, with the presets (the authors' published settings).
# The rows and the flags that select them come from the method registry (methods.py), through
# `python main.py --list_methods --names --dataset DATASET --train_mode MODE`: full labels, AN, WAN, LSAN, EPR, ROLE,
# EM, EM+APL, LL-R, LL-Ct, LL-Cp and LL-R/Ct/Cp + BoostLU (alpha 5), less those a dataset or mode does not offer.
#
#   scripts/reproduce_table.sh DATASET [SEEDS...]            e.g. scripts/reproduce_table.sh coco 0 1 2
#   TRAIN_MODE=linear_init scripts/reproduce_table.sh DATASET  the LinearInit table (no BoostLU rows)
#   SAVE=... METHODS="AN LL-R" ...                            another folder, or a subset of the rows (any offered row)
#
# Extra main.py flags go in EXTRA (e.g. EXTRA="--num_workers 8"); main.py refuses one that repeats a flag the script
# sets itself (--seed, the row's --mod_scheme, ...). Finished runs are skipped, unfinished ones resume.
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
# One line per offered row: ROW <tab> table|extra <tab> FLAGS ("table": in the default set of rows).
# shellcheck disable=SC2086
listing=$($PY main.py --list_methods --names --dataset "$dataset" --train_mode "$mode")
declare -A flags=()
all_rows=""
default_methods=""
while IFS=$'\t' read -r row in_table row_flags; do
  [ -n "$row" ] || continue
  flags[$row]=$row_flags
  all_rows+=" $row"
  [ "$in_table" != table ] || default_methods+=" $row"
done <<< "$listing"
for method in ${METHODS:-$default_methods}; do
  if [ -z "${flags[$method]+set}" ]; then
    echo "error: METHODS: $method is not a row offered on $dataset ($mode); the rows are:$all_rows" >&2
    exit 2
  fi
done
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
