#!/usr/bin/env bash
# Every method on the synthetic default, several seeds, then a Markdown table of test mAP (mean +- std).
# Usage: scripts/synthetic_table.sh [SAVE_PATH] [SEEDS...]      e.g. scripts/synthetic_table.sh results/table 0 1 2
# Finished runs (final.json present) are skipped, so an interrupted table can be completed by running it again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
save=${1:-results/synthetic_table}
shift || true
seeds=("$@")
[ ${#seeds[@]} -gt 0 ] || seeds=(0 1 2)
methods=("full:--train_set_variant clean" "AN:--mod_scheme AN" "LL-R:--mod_scheme LL-R" "LL-Ct:--mod_scheme LL-Ct"
         "LL-Cp:--mod_scheme LL-Cp")
for seed in "${seeds[@]}"; do
  for entry in "${methods[@]}"; do
    name=${entry%%:*}
    run="$save/${name}_s$seed"
    if [ -f "$run/final.json" ]; then continue; fi
    rm -rf "$run"
    # shellcheck disable=SC2086
    $PY main.py --save_path "$save" --exp_name "${name}_s$seed" --seed "$seed" ${entry#*:} > /dev/null 2>&1 \
      || { echo "run $run failed; see: $PY main.py --save_path $save --exp_name ${name}_s$seed --seed $seed ${entry#*:}"; exit 1; }
  done
done
$PY - "$save" <<'PYEOF'
import json, statistics, sys
from pathlib import Path
save = Path(sys.argv[1])
print("| method | test mAP (mean +- std) | per seed | best epoch | seconds per run |")
print("|---|---|---|---|---|")
for name in ("full", "AN", "LL-R", "LL-Ct", "LL-Cp"):
    finals = [json.loads(p.read_text()) for p in sorted(save.glob(f"{name}_s*/final.json"))]
    maps = [f["test_map"] for f in finals]
    std = statistics.stdev(maps) if len(maps) > 1 else 0.0
    print(f"| {name} | {statistics.mean(maps):.1f} +- {std:.1f} | {' '.join(f'{m:.1f}' for m in maps)} "
          f"| {' '.join(str(f['best_epoch']) for f in finals)} | {statistics.mean(f['seconds'] for f in finals):.0f} |")
PYEOF
