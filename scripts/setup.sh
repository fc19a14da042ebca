#!/usr/bin/env bash
# One-step set-up on a fresh machine: a virtualenv in .venv with herd and everything its tests need.
# torch is pinned to 2.13.0 first: on the project's machines that is a CPU wheel on local disk, while an
# unpinned range would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --disable-pip-version-check "torch==${HERD_TORCH_VERSION:-2.13.0}"
pip install -q --disable-pip-version-check -e ".[test]"
