#!/usr/bin/env bash
# The GPU measurements in one script, for a machine with a CUDA device: install, the GPU tests, then
# the GPU benchmarks, each report written under $OUT (default: gpu-results/). From the repository root:
#
#     OUT=gpu-results bash bench/gpu_session.sh
#
# Budget: about 10 minutes on one H200 (install about 2, tests about 1, benchmarks about 6).
set -uo pipefail
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
pip install -q -c constraints.txt -e ".[dev]" > "$OUT/install.log" 2>&1 || { echo "install failed"; tail -20 "$OUT/install.log"; exit 1; }
python -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" | tee -a "$OUT/gpu.txt"
timeout 300 python -m pytest -m gpu -p no:cacheprovider -q -rs > "$OUT/gpu_tests.txt" 2>&1; echo "gpu tests: exit $?"
tail -3 "$OUT/gpu_tests.txt"
timeout 240 python bench/vectorized.py --sizes 10 80 --rounds 4 --compute cuda --out "$OUT/vectorized_cuda.txt"
timeout 420 python bench/engine_overhead.py --sizes 100 1000 --compute cuda --out "$OUT/engine_overhead_cuda.txt"
