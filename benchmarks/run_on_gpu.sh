#!/usr/bin/env bash
# The project's GPU checks, for a machine with one NVIDIA GPU (sized for an H100 or H200) that has torch, triton
# and transformers installed. Run from the repository root:
#
#   bash benchmarks/run_on_gpu.sh first          # at most 9 minutes: the GPU tests, then the pre-training
#                                                # throughput of the base model with both engines (DeepSpeed,
#                                                # eager; --engine torch, CUDA-graphed); results file in
#                                                # benchmarks/results/<device>-<date>-pretrain.{json,md}
#   bash benchmarks/run_on_gpu.sh tests          # the GPU tests alone, with up to 9 minutes
#   bash benchmarks/run_on_gpu.sh bench [ARGS]   # pytest benchmarks/ --benchmark [ARGS] (the full suite takes longer
#                                                # than 9 minutes: pass one bench_*.py file at a time)
#   bash benchmarks/run_on_gpu.sh capacity       # capacity_ab.py --batch 256 (a graphed step with and without the
#                                                # static-shape capacities)
#   bash benchmarks/run_on_gpu.sh profile        # profile_step.py: one training step in every mode, kernels by time
#
# DeepSpeed is often missing on such a machine and it may have no package index: wheels in .whl/ are installed
# offline when that folder exists (DeepSpeed, built with `pip wheel --no-deps deepspeed`, and its dependencies
# hjson, pydantic, pydantic-core, annotated-types, typing-inspection). Without DeepSpeed the pre-training runs are
# skipped and the script says why.
#
# Every step runs under its own time limit (and `first` under a total budget), so a stuck step costs its own share
# only and what finished before it is kept. The log goes to $OUT when that is set, else to /tmp/run_on_gpu; the
# results files are written to benchmarks/results/ and copied there too.
set -uo pipefail
mode=${1:?usage: run_on_gpu.sh first|tests|bench [pytest args]|capacity|profile}
shift
cd "$(dirname "$0")/.." || exit 2
log_dir=${OUT:-/tmp/run_on_gpu}
mkdir -p "$log_dir"
log=$log_dir/run_on_gpu-$mode.log
: >"$log"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
budget_end=$((SECONDS + ${RUN_ON_GPU_BUDGET_S:-520}))  # 9 minutes less the grace of a step killed at its limit

say() { echo "== $*" | tee -a "$log"; }

# step NAME LIMIT_S COMMAND...: run COMMAND for at most LIMIT_S seconds (less when the total budget runs out, with
# RESERVE_S seconds kept back for the steps after it), its output in the log and its last lines on the terminal.
# SIGINT first, so that pytest still prints its summary; SIGKILL 10 s later.
step() {
  local name=$1 limit=$2 start=$SECONDS lines rc
  shift 2
  local left=$((budget_end - ${RESERVE_S:-0} - SECONDS))
  ((left < limit)) && limit=$left
  if ((limit < 20)); then
    say "$name: skipped, the time budget is spent"
    return 1
  fi
  say "$name: $* (limit ${limit}s)"
  lines=$(wc -l <"$log")
  timeout -s INT -k 10 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  tail -n +"$((lines + 1))" "$log" | grep -v -i "warn" | tail -n "${TAIL_LINES:-12}"
  ((rc == 124 || rc == 130)) && say "$name: stopped at its ${limit}s limit"
  say "$name: exit $rc after $((SECONDS - start))s"
  return "$rc"
}

setup() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$log"
  if ls .whl/*.whl >/dev/null 2>&1; then
    step "install wheels from .whl/" 120 python3 -m pip install -q --no-index --no-deps --no-compile \
      --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
  fi
  step "install lxmert_fast" 120 python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
  if ! python3 -c "import deepspeed" >/dev/null 2>&1; then
    say "DeepSpeed is not importable: the pre-training runs will be skipped. Put DeepSpeed's wheel and its" \
      "dependencies' (hjson, pydantic, pydantic-core, annotated-types, typing-inspection) in .whl/ and run again."
  fi
}

gpu_tests() {  # the test files whose GPU parts are skipped on a CPU, most telling first
  local files=() f
  for f in tests/test_cuda_graphs.py tests/test_modeling_triton.py tests/kernels; do
    [ -e "$f" ] && files+=("$f")
  done
  TAIL_LINES=25 step "GPU tests" "$1" python3 -m pytest "${files[@]}" -q -rfEs -p no:cacheprovider
}

# pretrain_runs PARTS_DIR LIMIT_S: each engine's end-to-end run (benchmarks/bench_pretrain.py: base config,
# micro-batch 256, bf16), then the same loop fed one batch again and again (the step alone; the end-to-end record
# gets end_to_end_fraction), in its own pytest process, so that one that fails or hangs leaves the other's numbers.
pretrain_runs() {
  local parts=$1 limit=$2 engine
  for engine in deepspeed torch; do
    TAIL_LINES=6 step "pre-training throughput, engine $engine" "$limit" python3 -m pytest \
      "benchmarks/bench_pretrain.py::test_pretrain_throughput[$engine]" \
      "benchmarks/bench_pretrain.py::test_step_only_throughput[$engine]" --benchmark \
      --benchmark-results-dir "$parts/$engine" -q -rfEs -p no:cacheprovider
  done
}

# merge_results PARTS_DIR NAME: join the parts into benchmarks/results/<device>-<date>-NAME.json (+ .md, plots),
# copy them to the log folder and print the measured rows.
merge_results() {
  local parts=$1 name=$2 files first out
  mapfile -t files < <(find "$parts" -name '*.json' | sort)
  if ((${#files[@]} == 0)); then
    say "no results to write: no run finished (see $log)"
    return 1
  fi
  first=$(basename "${files[0]}" .json)
  out=benchmarks/results/$first-$name.json
  [ -e "$out" ] && out=benchmarks/results/$first-$name-$(date -u +%H%M%S).json
  step "results file" 60 python3 benchmarks/report.py --merge "$out" "${files[@]}"
  cp "${out%.json}".* "$log_dir"/ 2>/dev/null
  python3 - "$out" <<'PY' | tee -a "$log"
import json, sys
doc = json.load(open(sys.argv[1]))
print(f"{sys.argv[1]}: {doc['device']['name']}")
for r in doc["records"]:
    if r["role"] == "ours":
        mfu = f", MFU {r['mfu']:.1%}" if "mfu" in r else ""
        alone = (f", the step alone {r['step_only_samples_per_s']:.0f} ({r['end_to_end_fraction']:.0%} end to end)"
                 if "end_to_end_fraction" in r else "")
        print(f"  {r['impl']}: {r['samples_per_s']:.0f} samples/s{mfu}{alone}")
PY
}

case $mode in
  first)
    setup
    parts=$(mktemp -d)
    RESERVE_S=300 gpu_tests 240      # leaves the pre-training runs and the results file their time
    RESERVE_S=30 pretrain_runs "$parts" 130
    merge_results "$parts" pretrain
    ;;
  tests)
    setup
    gpu_tests 480
    ;;
  bench)
    setup
    [ $# -eq 0 ] && set -- benchmarks/
    # why an xformers operator refuses (a wheel built for another torch or CUDA shows here)
    timeout 60 python3 -m xformers.info >"$log_dir/xformers-info.log" 2>&1 || true
    touch /tmp/run_on_gpu.start
    TAIL_LINES=40 step "benchmarks" 480 python3 -m pytest "$@" --benchmark -q -rfEs -p no:cacheprovider
    find benchmarks/results -type f -newer /tmp/run_on_gpu.start -exec cp {} "$log_dir"/ \;
    ;;
  capacity)
    setup
    step "capacity A/B" 300 python3 benchmarks/capacity_ab.py --batch 256
    ;;
  profile)
    setup
    TAIL_LINES=60 step "profile one step" 480 python3 benchmarks/profile_step.py --out "$log_dir/profile-step.json"
    ;;
  *)
    echo "unknown mode $mode (first, tests, bench, capacity or profile)"
    exit 2
    ;;
esac
say "done in ${SECONDS}s; log: $log"
