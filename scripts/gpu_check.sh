#!/usr/bin/env bash
# Issue 4's GPU check, as one command on a CUDA machine, from the repository root; results go to ${OUT:-gpu_out}.
#  1. the tests that take the `device` fixture, on CUDA: logits and greedy ids vs transformers, cache vs full
#     recompute, ragged batches, seeded sampling, overlapped steps, compiled decode (herd's CUDA graph);
#  2. bf16 decode and prefill speed of the Llama-3.1-8B and Llama-3.2-1B shapes on random weights, against
#     transformers and the GPU's copy bandwidth (benchmarks/decode.py --device cuda --compile);
#  3. `herd bench --device cuda --only decode --quick`: the fingerprint of the GPU and the decode stage run on it.
# Only torch, transformers, safetensors and tqdm are needed (herd runs from src/, its CPU kernels stay off).
set -o pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1 HERD_CPU_KERNELS=0
PY=${PYTHON:-python3}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/env.txt"
timeout ${T_TESTS:-150} $PY -m pytest -q -p no:cacheprovider -k cuda tests/test_generate.py tests/test_model.py 2>&1 \
  | tee "$OUT/tests.txt"
decode() {  # shape, time limit
  timeout "$2" $PY benchmarks/decode.py --device cuda --threads 8 --config "$1" --compile --no-quant --repeats 2 \
    --json "$OUT/decode_$1.json" 2>&1 | tee "$OUT/decode_$1.txt"
}
decode llama-3.1-8b ${T_8B:-240}
timeout ${T_BENCH:-100} $PY -m herd bench --device cuda --only decode --quick --json "$OUT/bench.json" 2>&1 \
  | tee "$OUT/bench.txt"
decode llama-3.2-1b ${T_1B:-150}
