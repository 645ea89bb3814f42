"""The prepared GPU check: throughput at the paper's settings and the effect of bf16 on mAP, as one JSON summary.

    bash bench/gpu_check.sh           # on the GPU machine: system python3, no venv, no network; under 8 minutes
    GPU_CHECK_SMALL=1 bash bench/gpu_check.sh   # the same steps, tiny, to check the script itself on a CPU

Steps: (1) ``bench/throughput.py`` in full mode (ResNet-50, 448x448, batch 16, 1,024 generated 640x480 JPEGs):
official-style against this project's pipeline, their ratio, peak GPU memory and the implied COCO run time;
(2) LL-R on the synthetic dataset, three seeds each with ``--precision bf16`` and ``--precision fp32``, so the effect
of bf16 on test mAP is measured on the same machine.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(cmd: list[str], timeout: int) -> str:
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc.stdout


def main() -> None:
    small = os.environ.get("GPU_CHECK_SMALL") == "1"
    started = time.time()
    summary: dict = {}
    bench = [sys.executable, "bench/throughput.py"] + (["--small", "--images", "32", "--batches", "2"] if small else [])
    summary["throughput"] = json.loads(run(bench, 400).strip().splitlines()[-1])
    with tempfile.TemporaryDirectory() as tmp:
        data_root = str(Path(tmp) / "synthetic")
        maps: dict[str, list[float]] = {"bf16": [], "fp32": []}
        seconds: dict[str, list[float]] = {"bf16": [], "fp32": []}
        for seed in (0, 1, 2):
            for precision in ("bf16", "fp32"):
                name = f"{precision}_s{seed}"
                args = [sys.executable, "main.py", "--data_root", data_root, "--save_path", tmp, "--exp_name", name,
                        "--seed", str(seed), "--precision", precision, "--num_workers", "4"]  # fmt: skip
                args += ["--num_epochs", "2", "--ss_frac_train", "0.1"] if small else []
                run(args, 300)
                final = json.loads((Path(tmp) / name / "final.json").read_text())
                maps[precision].append(final["test_map"])
                seconds[precision].append(final["seconds"])
        summary["synthetic_ll_r_test_map"] = {
            p: {"per_seed": [round(m, 2) for m in v], "mean": round(statistics.mean(v), 2)} for p, v in maps.items()
        }
        summary["synthetic_ll_r_seconds_per_run"] = {p: round(statistics.mean(v), 1) for p, v in seconds.items()}
    summary["total_seconds"] = round(time.time() - started, 1)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
