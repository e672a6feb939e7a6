#!/usr/bin/env bash
# Download the wheels bench/gpu_check.py needs that the bare GPU machine lacks, into .whl/ (ignored by git).
#
# The GPU machine (see /work/.library/device/README.md) has Python 3.12, torch, transformers, safetensors, pyarrow,
# pyyaml, pillow and tqdm, but no diffusers, pydantic or Ray, and it cannot reach a package index.  gpu_check
# needs diffusers (the model classes) only; pydantic and pydantic-core come along for whoever wants to import
# more of skyray there.  Same versions as this checkout's venv, CPython 3.12 manylinux x86_64 builds, no
# dependencies (the machine has them).  About 6 MB: well under the 64 MiB a device call may carry.
#
#   bench/prepare_gpu_wheels.sh                # here, once (needs the package index)
#   # then on the device machine, with carry: [".whl"]:
#   python -m pip install -q --no-index --no-deps .whl/*.whl && python bench/gpu_check.py --json "$OUT/gpu_check.json"
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
pins=("diffusers==$(version diffusers)" "pydantic==$(version pydantic)" "pydantic-core==$(version pydantic-core)")
rm -rf .whl
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --implementation cp --python-version 3.12 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "${pins[@]}"
ls -1 .whl
du -sh .whl
