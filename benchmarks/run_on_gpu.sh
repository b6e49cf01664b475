#!/usr/bin/env bash
# Every GPU check of the project, for a lent GPU machine that has torch, triton and transformers but no DeepSpeed or
# xformers. Run from the repository root there, with .whl (made here by ../shared/gpu/fetch-wheels.sh) carried along:
#
#   bash benchmarks/run_on_gpu.sh tests          # compiled kernels, triton backend, CUDA graphs (~4 min)
#   bash benchmarks/run_on_gpu.sh first          # tests, then capacity_ab.py --batch 256: the first call to make
#   bash benchmarks/run_on_gpu.sh bench [ARGS]   # pytest benchmarks/ --benchmark [ARGS]; results in benchmarks/results/
#
# The whole suite took about 15 minutes on an H100 before bench_pretrain.py ran four pre-training cases (both
# engines, eager and --compile; not yet timed); within a device call's 10-minute limit run it in three parts:
#   bash benchmarks/run_on_gpu.sh bench benchmarks/bench_kernels.py benchmarks/bench_data.py
#   bash benchmarks/run_on_gpu.sh bench benchmarks/bench_pretrain.py
#   bash benchmarks/run_on_gpu.sh bench benchmarks/bench_model.py -k "not cpu_target"
# and join the result files with `python benchmarks/report.py --merge OUT.json A.json B.json C.json`.
# The capacities' gain on a graphed step (not part of the suite; about a minute):
#   python3 benchmarks/capacity_ab.py --batch 256 | tee "$OUT/capacity-ab.log"
# Logs and the results this run wrote are also copied to $OUT when it is set (the device tool's output folder).
set -uo pipefail
mode=${1:?usage: run_on_gpu.sh tests|first|bench [pytest args]}
shift
out=${OUT:-benchmarks/results}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
touch /tmp/run_on_gpu.start
run_tests() {
  timeout "$1" python3 -m pytest tests/kernels tests/test_modeling_triton.py tests/test_cuda_graphs.py \
    tests/test_modeling.py -q -rs -p no:cacheprovider 2>&1 | tee "$out/gpu-tests.log" | tail -15
}
case $mode in
  tests) run_tests 540 ;;
  first) run_tests 420
         timeout 150 python3 benchmarks/capacity_ab.py --batch 256 2>&1 | tee "$out/capacity-ab.log" | tail -5 ;;
  bench) [ $# -eq 0 ] && set -- benchmarks/
         # why an xformers operator refuses (a wheel built for another torch or CUDA shows here), for the notes
         timeout 60 python3 -m xformers.info > "$out/xformers-info.log" 2>&1 || true
         timeout 560 python3 -m pytest "$@" --benchmark -q -rs -p no:cacheprovider 2>&1 \
           | tee "$out/benchmark.log" | grep -v -i warn | tail -40
         if [ "$out" != benchmarks/results ]; then
           find benchmarks/results -type f -newer /tmp/run_on_gpu.start -exec cp {} "$out"/ \;
         fi ;;
  *) echo "unknown mode $mode (tests, first or bench)"; exit 2 ;;
esac
