#!/usr/bin/env bash
# One device call: the GPU checks and timings a change to kernels/, decode or the options could move.
#   bash bench/device_run.sh [tests] [ab] [offload]      (default: all three)
# Results under $OUT (JSON + logs); the short tables come last in the output.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
parts=${*:-tests ab offload}
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, \
'transformers', transformers.__version__, torch.cuda.get_device_name())"
pip install -q --no-deps -e . >/dev/null 2>&1 || true
for part in $parts; do
  case $part in
    tests)  # kernels against their references on the GPU, the split-K epilogue, PDL, Sirius's captured check
      timeout 240 python3 -m pytest -q -x -p no:cacheprovider tests/kernels/test_kernel_split_k.py \
        tests/kernels/test_kernel_core.py tests/kernels/test_kernel_pdl.py tests/kernels/test_kernel_deterministic.py \
        tests/kernels/test_kernel_input_sparse_prefetch.py tests/kernels/test_kernel_batch_ops.py \
        "tests/test_correction.py::test_cuda_graph_correction_equals_eager_on_gpu" 2>&1 | tee "$OUT/tests.log" | tail -15 ;;
    ab)  # end to end after the options refactor and the shared epilogue: dense / TEAL / M-COUNTDOWN
      timeout 330 python3 bench/ab.py --configs dense,teal:0.5:0.5,m-countdown:0.7:0.5 --new-tokens 128 \
        --deadline 300 2>&1 | tee "$OUT/ab.log" | tail -20 ;;
    offload)
      timeout 480 python3 bench/offload.py --device cuda --shape llama-3-8b --budget 8GiB --deadline 450 --hit-rates m-countdown=0.35 2>&1 | tee "$OUT/offload.log" | tail -25 ;;
  esac
done
