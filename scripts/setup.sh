#!/usr/bin/env bash
# One-step set-up on a fresh machine: a virtualenv in .venv with herd and everything its tests need.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip() { python -m pip -q --disable-pip-version-check "$@"; }

# torch first, pinned: on the project's machines 2.13.0 is a CPU wheel on local disk, while an unpinned range
# would pull a multi-GB CUDA build.
pip install "torch==${HERD_TORCH_VERSION:-2.13.0}"

# llama-cpp-python is the GGUF oracle in the tests. It has no binary wheel, so it is built from source (~5 min),
# once per machine: the wheel is kept in ~/.cache/herd-wheels. ggml's AMX kernels segfault on Q8_0 matmuls on
# this machine's CPUs, so the build targets AVX2 (+AVX-512 where the CPU has it) instead of -march=native.
LLAMA_CPP_VERSION=0.3.36
if ! python -c "import llama_cpp" 2>/dev/null; then
  flags=""
  if [ "$(uname -m)" = x86_64 ]; then
    flags="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
    grep -qw avx512f /proc/cpuinfo && flags="$flags -DGGML_AVX512=ON"
    grep -qw avx512_vnni /proc/cpuinfo && flags="$flags -DGGML_AVX512_VNNI=ON"
    grep -qw avx512_bf16 /proc/cpuinfo && flags="$flags -DGGML_AVX512_BF16=ON"
  fi
  wheels="$HOME/.cache/herd-wheels/llama-cpp-$(echo "$LLAMA_CPP_VERSION $flags" | md5sum | cut -c1-12)"
  if ! ls "$wheels"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    echo "building llama-cpp-python $LLAMA_CPP_VERSION from source (about 5 minutes, once per machine)" >&2
    CMAKE_ARGS="$flags" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
      pip wheel --no-cache-dir --no-deps -w "$wheels.tmp" "llama-cpp-python==$LLAMA_CPP_VERSION"
    rm -rf "$wheels" && mv "$wheels.tmp" "$wheels"
  fi
  pip install --find-links "$wheels" "llama-cpp-python==$LLAMA_CPP_VERSION"
fi

# Chromium from Debian for the playground test (tests/test_playground.py drives it with Playwright; no browser
# download), once per machine.
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi

pip install -e ".[test]"

# `lm_eval --model herd`: a .pth hook that registers herd's model type when lm-eval is imported.
site=$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "import herd_lm_eval_hook" > "$site/herd-lm-eval.pth"
