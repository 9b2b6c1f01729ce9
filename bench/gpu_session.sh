#!/usr/bin/env bash
# The GPU measurements in one script, for a machine with a CUDA device: install, the GPU tests, then
# the GPU benchmarks, each report written under $OUT (default: gpu-results/) and the whole output in
# $OUT/session.log. From the repository root:
#
#     OUT=gpu-results bash bench/gpu_session.sh
#     SKIP_INSTALL=1 OUT=gpu-results bash bench/gpu_session.sh   # the packages are importable already
#     STEPS="engines paper" bash bench/gpu_session.sh     # some of: tests vectorized breakdown workers engines paper
#
# On one H200 the tests took 22 s, vectorized 14 s and the N=1000 engine table about 2 minutes
# (docs/results/gpu_h200.log); each step has its own time limit, so a slow step costs its own
# figures only, and its progress lines are in the log.
set -uo pipefail
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
exec > >(tee "$OUT/session.log") 2>&1
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
if [ -z "${SKIP_INSTALL:-}" ]; then
    pip install -q -c constraints.txt -e ".[dev]" || { echo "install failed"; exit 1; }
fi
python -c "import torch, flwr, ray; print('torch', torch.__version__, torch.cuda.get_device_name(0), '| flwr', flwr.__version__, '| ray', ray.__version__)" | tee -a "$OUT/gpu.txt"

step() {  # step SECONDS NAME COMMAND...: run with a time limit and say how it ended
    local limit=$1 name=$2; shift 2
    local started=$SECONDS
    timeout "$limit" "$@"; local rc=$?
    echo "== $name: exit $rc after $((SECONDS - started)) s (limit $limit s)"
}

wanted() { [[ " ${STEPS:-tests vectorized breakdown workers engines paper} " == *" $1 "* ]]; }

wanted tests && step 150 "gpu tests" python -m pytest -m gpu tests/test_compute.py tests/test_resident_data.py tests/test_vectorized.py \
    -p no:cacheprovider -q -rs --junitxml="$OUT/gpu_tests.xml"
wanted vectorized && step 60 "vectorized" python bench/vectorized.py --sizes 10 80 --rounds 4 --compute cuda \
    --out "$OUT/vectorized_cuda.txt"
wanted breakdown && step 60 "round breakdown" python bench/round_breakdown.py --compute cuda \
    --out "$OUT/round_breakdown_cuda.txt"
wanted breakdown && step 60 "round breakdown, 80 clients a vmap" python bench/round_breakdown.py --compute cuda \
    --batch-clients 80 --out "$OUT/round_breakdown_cuda_vmap.txt"
wanted workers && step 150 "inprocess worker threads, N=100" python bench/engine_overhead.py --sizes 100 \
    --skip-ray --workers 2 4 8 --compute cuda --out "$OUT/engine_workers_cuda.txt"
wanted engines && step 150 "engines, N=100" python bench/engine_overhead.py --sizes 100 --batch-clients 80 \
    --compute cuda --out "$OUT/engine_overhead_cuda.txt"
wanted engines && step 120 "engines, N=1000" python bench/engine_overhead.py --sizes 1000 --batch-clients 80 \
    --compute cuda --out "$OUT/engine_overhead_cuda_1000.txt"
wanted paper && step 280 "the paper preset" python bench/engine_overhead.py --sizes --batch-clients 80 --paper \
    --rounds 3 --compute cuda --out "$OUT/engine_overhead_cuda_paper.txt"
exit 0
