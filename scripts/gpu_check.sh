#!/usr/bin/env bash
# Issue 4's GPU check, as one command on a CUDA machine, from the repository root; results go to ${OUT:-gpu_out}.
#  1. the tests that take the `device` fixture, on CUDA: logits and greedy ids vs transformers, cache vs full
#     recompute, ragged batches, seeded sampling, overlapped steps, compiled decode (herd's CUDA graph);
#  2. bf16 decode and prefill speed of the Llama-3.1-8B and Llama-3.2-1B shapes on random weights, against
#     transformers and the GPU's copy bandwidth (benchmarks/decode.py --device cuda --compile);
#  3. `herd bench --device cuda --only decode --quick`: the fingerprint of the GPU and the decode stage run on it;
#  4. int8 and int4 decode of the 8B shape, eager and compiled (the fused dequantizing reduction).
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
STEPS=${STEPS:-tests 8b bench 1b quant}  # a subset runs only those steps, e.g. STEPS="tests quant"
step() { [[ " $STEPS " == *" $1 "* ]]; }
decode() {  # shape, time limit, extra arguments
  timeout "$2" $PY benchmarks/decode.py --device cuda --threads 8 --config "$1" --compile --repeats 2 "${@:3}" \
    --json "$OUT/decode_$1$SUFFIX.json" 2>&1 | tee "$OUT/decode_$1$SUFFIX.txt"
}
if step tests; then
  timeout ${T_TESTS:-150} $PY -m pytest -q -p no:cacheprovider -k cuda tests/test_generate.py tests/test_model.py \
    tests/test_quantize.py 2>&1 | tee "$OUT/tests.txt"
fi
step 8b && decode llama-3.1-8b ${T_8B:-240} --no-quant
if step bench; then
  timeout ${T_BENCH:-100} $PY -m herd bench --device cuda --only decode --quick --json "$OUT/bench.json" 2>&1 \
    | tee "$OUT/bench.txt"
fi
step 1b && decode llama-3.2-1b ${T_1B:-150} --no-quant
# int8 / int4 at 8B: eager (the float copy per call) and compiled (the fused multiply + sum, in herd's CUDA graph)
step quant && SUFFIX=_quant decode llama-3.1-8b ${T_QUANT:-300} --compile-default-only --no-hf --prefill 0
true
