#!/usr/bin/env bash
# Set-up on a fresh machine, sized by need (README, Quickstart):
#
#   bash scripts/setup.sh          .venv with herd and what it needs to run: serve, chat, generate, convert,
#                                  quantize, pretrain, finetune (pyproject's [project.dependencies]); ~1-2 minutes
#   bash scripts/setup.sh --test   the same + the test extras (pyproject's [test]): transformers, peft, lm-eval,
#                                  the server tests' clients, llama-cpp-python built from source (the GGUF oracle,
#                                  ~5 minutes once per machine) and Debian's Chromium (the playground test)
#
# Every step prints one line on stderr and pip prints one line per package, so nothing is silent for long.
set -euo pipefail
cd "$(dirname "$0")/.."
TEST=0
case "${1:-}" in
  --test) TEST=1 ;;
  "") ;;
  *) echo "usage: bash scripts/setup.sh [--test]" >&2; exit 2 ;;
esac
step() { echo "setup [${SECONDS}s]: $*" >&2; }
PY=${PYTHON:-python3}

step "virtualenv .venv"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
# pip's own lines, one per package (Collecting / Building / Installing / Successfully installed); errors go to stderr
pip() {
  python -m pip --disable-pip-version-check "$@" \
    | sed -un '/^\(Collecting\|Downloading\|Building\|Installing\|Successfully\|Processing\)/p'
}

# torch first, pinned: on the project's machines 2.13.0 is a CPU wheel on local disk, while an unpinned range
# would pull a multi-GB CUDA build.
TORCH="torch==${HERD_TORCH_VERSION:-2.13.0}"
if ! python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '${TORCH#torch==}')" 2>/dev/null; then
  step "installing $TORCH (a ~200 MB wheel: about a minute)"
  pip install "$TORCH"
fi

step "installing herd and its runtime dependencies (pyproject.toml: dependencies)"
pip install -e .

# `lm_eval --model herd`: a .pth hook that registers herd's model type when lm-eval is imported (stdlib only; it
# does nothing until lm-eval is imported).
site=$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "import herd_lm_eval_hook" > "$site/herd-lm-eval.pth"

if [ "$TEST" = 1 ]; then
  # llama-cpp-python is the GGUF oracle in the tests. It has no binary wheel, so it is built from source (~5 min
  # on 2 cores), once per machine: the wheel is kept in ~/.cache/herd-wheels. ggml's AMX kernels segfault on Q8_0
  # matmuls on this machine's CPUs, so the build targets AVX2 (+AVX-512 where the CPU has it), not -march=native.
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
      step "building llama-cpp-python $LLAMA_CPP_VERSION from source (the tests' GGUF oracle): about 5 minutes on" \
           "2 cores with no output while the compiler runs, once per machine (kept in $wheels)"
      CMAKE_ARGS="$flags" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
        pip wheel --no-cache-dir --no-deps -w "$wheels.tmp" "llama-cpp-python==$LLAMA_CPP_VERSION"
      rm -rf "$wheels" && mv "$wheels.tmp" "$wheels"
    fi
    step "installing llama-cpp-python from $wheels"
    pip install --find-links "$wheels" "llama-cpp-python==$LLAMA_CPP_VERSION"
  fi

  # Chromium from Debian for the playground test (tests/test_playground.py drives it with Playwright; no browser
  # download), once per machine.
  if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null; then
    step "installing Debian's chromium for the playground test (apt-get; about a minute, once per machine)"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
  fi

  step "installing the test extras (pyproject.toml: [test])"
  pip install -e ".[test]"
fi
step "done in ${SECONDS}s"
