#!/usr/bin/env bash
# All GPU checks in one go (under 6 minutes on one H100/H200): the CUDA correctness tests (fp8 among
# them), the 8B-shaped throughput benchmark against transformers and fp8 against bf16 (batch 1 and 64,
# about 40 s more: a second engine start, quantizing as it loads), then the serving benchmark's closed
# loop (concurrency 1..64) on the same random model. Drives the engine directly (no Ray).
# Results land in $OUT (when set) or benchmarks/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$out/gpu_tests.log"
tests=${PIPESTATUS[0]}
python3 -m benchmarks.gpu_bench --out "$out/gpu_bench.json" 2>&1 | grep -v "it/s\]$" | tee "$out/gpu_bench.log"
bench=${PIPESTATUS[0]}
python3 -m benchmarks.gpu_serving_bench --concurrency 1 4 16 64 --max-seconds-per-point 12 --out "$out" 2>&1 | grep -v "it/s\]$" | tee "$out/gpu_serving.log"
serving=${PIPESTATUS[0]}
echo "gpu tests exit $tests, benchmark exit $bench, serving benchmark exit $serving"
exit $(( tests || bench || serving ))
