#!/usr/bin/env bash
# The prepared GPU check (see bench/gpu_check.py): runs as is on the GPU machine with its system python3, from the
# repository root, and prints one JSON object. GPU_CHECK_SMALL=1 runs the same steps tiny, on a CPU;
# arguments go to bench/gpu_check.py (--arch NAME).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
$PY -c "import torch, torchvision, numpy, PIL, tqdm; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available(), file=__import__('sys').stderr)"
exec $PY bench/gpu_check.py "$@"
