#!/usr/bin/env bash
# The GPU checks of issues 19 and 20 in one run on a lent H100/H200 (about 8 minutes), figures into $OUT:
#   bash bench/gpu_checks.sh            (the device tool runs it from the repository root; OUT defaults to ./gpu-out)
# The device image has torch, transformers and triton but not this project's other dependencies: the first step says
# which imports are missing, so that their wheels can be carried (bench/README.md).
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/device.csv" 2>&1
python - <<'PY' > "$OUT/versions.txt" 2>&1
import importlib
for name in ("torch", "transformers", "triton", "pydantic", "numpy", "PIL", "av", "decord", "flash_attn"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as exc:
        print(name, "MISSING", type(exc).__name__)
PY
cat "$OUT/versions.txt"
python -c "import bench.gpu_engine, bench.gpu_families" || { echo "the benches do not import here: see $OUT/versions.txt"; exit 3; }
timeout 330 python -m bench.gpu_engine --frames 32 --requests 32 --tokens 32 256 --decode-modes dynamic compiled --json \
  > "$OUT/gpu_engine.txt" 2>&1; echo "gpu_engine rc=$?"
timeout 150 python -m bench.gpu_families --json > "$OUT/gpu_families.txt" 2>&1; echo "gpu_families rc=$?"
tail -n 3 "$OUT"/gpu_*.txt
