#!/usr/bin/env bash
# Every GPU check of the project, for a lent GPU machine that has torch, triton and transformers but no DeepSpeed or
# xformers. Run from the repository root there, with .whl (made here by ../shared/gpu/fetch-wheels.sh) carried along:
#
#   bash benchmarks/run_on_gpu.sh tests    # compiled kernels and the triton backend against their references (~3 min)
#   bash benchmarks/run_on_gpu.sh bench    # pytest benchmarks/ --benchmark (~7 min); results in benchmarks/results/
#
# Logs and results are also copied to $OUT when it is set (the device tool's output folder).
set -uo pipefail
mode=${1:?usage: run_on_gpu.sh tests|bench}
out=${OUT:-benchmarks/results}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
case $mode in
  tests) timeout 540 python3 -m pytest tests/kernels tests/test_modeling_triton.py tests/test_modeling.py -q -rs \
           -p no:cacheprovider 2>&1 | tee "$out/gpu-tests.log" | tail -15 ;;
  bench) timeout 540 python3 -m pytest benchmarks/ --benchmark -q -rs -p no:cacheprovider 2>&1 \
           | tee "$out/benchmark.log" | tail -30
         [ "$out" != benchmarks/results ] && cp benchmarks/results/* "$out"/ 2>/dev/null ;;
  *) echo "unknown mode $mode (tests or bench)"; exit 2 ;;
esac
