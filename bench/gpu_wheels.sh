#!/usr/bin/env bash
# Wheels for a lent GPU machine, into .whl/ (git-ignored): its image has torch, torchvision, pillow and
# transformers 5.17 but not this project's transformers (>= 5.20: get_video_features takes pixel_values_videos),
# the huggingface_hub that transformers needs, nor pydantic. Same versions as this machine's .venv; the image's
# Python is 3.12. bench/gpu_checks.sh installs them there when .whl/ travels:
#   bash bench/gpu_wheels.sh [PYTHON_VERSION]     then the device run names .whl in carry
set -euo pipefail
PY=${1:-3.12}
PACKAGES="transformers huggingface_hub httpx2 httpcore2 truststore kernels tomlkit pydantic pydantic_core
annotated_types typing_inspection typing_extensions"
# shellcheck disable=SC2086
pins=$(.venv/bin/python -m pip show $PACKAGES 2>/dev/null | awk '/^Name:/{n=$2} /^Version:/{print n"=="$2}')
rm -rf .whl && mkdir -p .whl
# shellcheck disable=SC2086
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl $pins 2>&1 | grep -v "is ignored" || true
ls .whl | wc -l | xargs echo "wheels:" && du -sh .whl
