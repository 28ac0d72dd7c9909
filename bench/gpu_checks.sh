#!/usr/bin/env bash
# The GPU checks of issues 19 and 20 in one run on a lent H100/H200 (about 8 minutes), figures into $OUT:
#   bash bench/gpu_wheels.sh                 (here, once: the wheels the device image lacks, into .whl/)
#   bash bench/gpu_checks.sh                 (there, from the repository root, with .whl carried; OUT: ./gpu-out)
#   DRY_RUN=1 bash bench/gpu_checks.sh       (a CPU rehearsal: tiny shapes, a few requests, the same steps)
# The device image has torch, torchvision, pillow and transformers 5.17; this project needs transformers >= 5.20 and
# pydantic: carried wheels are installed into /tmp/site, ahead of the image's packages on PYTHONPATH.
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONPATH=$PWD PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "the carried wheels do not install"; exit 3; }
  export PYTHONPATH=/tmp/site:$PWD
fi
if [ -n "${DRY_RUN:-}" ]; then
  ENGINE="--shape tiny --frames 16 --requests 4 --tokens 8 16"; FAMILIES="--shape tiny"; ENGINE_S=600; FAMILIES_S=300
else
  ENGINE="--frames 32 --requests 32 --tokens 32 256"; FAMILIES=""; ENGINE_S=330; FAMILIES_S=150
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/device.csv" 2>&1
python3 - <<'PY' > "$OUT/versions.txt" 2>&1
import importlib
import sys

print("python", sys.version.split()[0])
for name in ("torch", "torchvision", "transformers", "huggingface_hub", "tokenizers", "triton", "pydantic", "numpy",
             "PIL", "flash_attn"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as exc:
        print(name, "MISSING", type(exc).__name__)
PY
cat "$OUT/versions.txt"
python3 -c "import bench.gpu_engine, bench.gpu_families, video_llava.engine" \
  || { echo "the benches do not import here: see $OUT/versions.txt"; exit 3; }
# shellcheck disable=SC2086
timeout "$ENGINE_S" python3 -m bench.gpu_engine $ENGINE --decode-modes dynamic compiled --attentions gather flex --json \
  > "$OUT/gpu_engine.txt" 2>&1; echo "gpu_engine rc=$?"
# shellcheck disable=SC2086
timeout "$FAMILIES_S" python3 -m bench.gpu_families $FAMILIES --json > "$OUT/gpu_families.txt" 2>&1
echo "gpu_families rc=$?"
tail -n 3 "$OUT"/gpu_*.txt
