#!/usr/bin/env bash
# GPU check, for a machine with an NVIDIA GPU and its own python3 with torch and triton (no Bazel, no network
# needed there). It runs from the bundle tools/gpu_bundle.sh builds (GPU_BUNDLE, default .gpu_bundle/: codex_ml
# with its compiled libraries, bench_train, the wheels the machine lacks); without one it assembles codex_ml from
# the sources and builds the CUDA libraries with nvcc (tools/gpu_bundle.sh --libs nvcc), and says so. Then:
#   1. load check: the libraries load (ctypes) and the imports work; one line says what is missing;
#   2. the stages, by value: tests (pytest-xdist, a time limit per test, the Triton sweeps cut to a case per code
#      path), bench_attention, bench_linear_cross_entropy, bench_layers, tune_attention, bench_train. Each has its
#      own budget, cut to what is left of the deadline; one that would get too little is skipped and named in the
#      summary. Every benchmark rewrites its JSON file after each row, so a stage stopped at its budget keeps the
#      rows it finished;
#   3. the summary (tools/gpu_summary.py): printed last, and written as summary.txt.
# Logs and JSON go to GPU_CHECK_OUT (default /tmp/gpu_check). When OUT names a directory (one a batch job
# collects), it gets at most 8 files, rewritten after every stage: gpu_check.tgz (all logs and JSON), summary.txt
# and each benchmark's JSON file.
#   usage: tools/gpu_check.sh [gpu|quick [stage ...]]   (stages: as above, default all, in that order)
#   env:   PYTHON (default python3), GPU_BUNDLE, GPU_CHECK_DEADLINE (seconds for the whole run, default 540: it
#          fits a 10-minute job limit; the stages' budgets are shares of it), NVCC (the fallback build only)
# Without a CUDA device it makes a dry run: the same load check, every module of the package and the benchmarks
# imported, the GPU tests collected, and each stage at its smallest size on the CPU (the benchmarks' quick
# preset, the tile tuning in the Triton interpreter); tests/build/gpu_check_test.py runs it on the bundle.
set -uo pipefail
cd "$(dirname "$0")/.."
preset="${1:-gpu}"
py="${PYTHON:-python3}"
bundle="${GPU_BUNDLE:-.gpu_bundle}"
deadline="${GPU_CHECK_DEADLINE:-540}"
SECONDS=0
out="${GPU_CHECK_OUT:-/tmp/gpu_check}"
mkdir -p "${out}"
rm -f "${out}/stages.txt"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 TRITON_DEFAULT_FP_FUSION=1
pack() {
  [[ -n "${OUT:-}" ]] || return 0
  tar czf "${OUT}/gpu_check.tgz.part" -C "${out}" . && mv "${OUT}/gpu_check.tgz.part" "${OUT}/gpu_check.tgz"
  for json in "${out}"/*.json; do [[ -f "${json}" ]] && cp "${json}" "${OUT}/"; done
  return 0
}

tree="$(mktemp -d)"
trap 'rm -rf "${tree}"' EXIT
build_status=0
if [[ -f "${bundle}/BUNDLE" ]]; then
  echo "== bundle ${bundle}"
  sed 's/^/   /' "${bundle}/BUNDLE"
  cp -r "${bundle}/codex_ml" "${bundle}/benchmarks" "${tree}/"
  chmod -R u+w "${tree}"
  wheels=("${bundle}"/wheels/*.whl)
else
  echo "== no bundle at ${bundle}: assembling codex_ml from the sources and building the CUDA libraries with nvcc" \
       "here (tools/gpu_bundle.sh makes the bundle beforehand)"
  tools/gpu_bundle.sh --out "${tree}/bundle" --libs nvcc --no-wheels > "${out}/bundle.log" 2>&1 || build_status=1
  (( build_status )) && { echo "FAILED to build the bundle:"; tail -25 "${out}/bundle.log"; }
  cp -r "${tree}/bundle/codex_ml" "${tree}/bundle/benchmarks" "${tree}/" 2>/dev/null
  wheels=()
fi
if [[ -f "${wheels[0]:-}" ]]; then
  "${py}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "${tree}/site" "${wheels[@]}" \
    > "${out}/wheels.log" 2>&1 || echo "FAILED to install the bundle's wheels (wheels.log)"
fi
export PYTHONPATH="${tree}:${tree}/site${PYTHONPATH:+:${PYTHONPATH}}"
# The tests run from plain copies (in a runfiles tree they are links, whose folders pytest can't import from).
cp -rL tests "${tree}/tests"
find "${tree}/tests" -name __init__.py -empty -delete  # Bazel's runfiles add them; the test folders are no packages
mapfile -t gpu_tests < <(cd "${tree}" && ls tests/*/*gpu_test.py 2>/dev/null)

# A C++ CPU extension built for another torch release may not load here (or may crash its process): each is tried
# in a process of its own, and one that fails is dropped, so that its ops take their PyTorch path.
for ext in "${tree}"/codex_ml/kernels/*/cpu.so; do
  [[ -f "${ext}" ]] || continue
  name="$(basename "$(dirname "${ext}")")"
  "${py}" -c "import torch, codex_ml.kernels.${name}.cpu" > /dev/null 2>&1 \
    || { rm -f "${ext}" && echo "${name}" >> "${tree}/dropped_extensions"; } &
done
wait

echo "== load check"
DROPPED="$(tr '\n' ' ' < "${tree}/dropped_extensions" 2>/dev/null)" "${py}" - <<'PY' 2>&1 | tee "${out}/env.txt"
import ctypes
import importlib
import os
import sys

missing, notes = [], []
try:
    import torch
    import triton

    import codex_ml
    import codex_ml.kernels
    from codex_ml.ops import dispatch
except Exception as err:  # noqa: BLE001  (nothing can run: say what and stop)
    print(f"load check: MISSING {type(err).__name__}: {err} (torch, triton and codex_ml must import)")
    sys.exit(3)
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
print(f"codex_ml {codex_ml.__version__} from {codex_ml.__path__[0]}")
print(f"python {sys.version.split()[0]}  torch {torch.__version__}  triton {triton.__version__}  {gpu}")
folder = os.path.dirname(codex_ml.kernels.__file__)
for op, filename in dispatch.CUDA_LIBRARIES.items():
    try:
        ctypes.CDLL(os.path.join(folder, op, filename))
    except OSError as err:
        missing.append(f"{filename} ({str(err).split(': ')[-1]})")
dropped = os.environ.get("DROPPED", "").split()
if dropped:
    notes.append(f"C++ CPU extensions {', '.join(dropped)} do not load under torch {torch.__version__} (their ops "
                 "run PyTorch on CPU tensors)")
# Needed: the trainer's config (gin), the commands' flags (absl). Without the test runner's plugins the tests run
# in one process without a limit per test; without the comparisons' libraries their rows are left out.
for name, role in (("gin", "needed"), ("absl", "needed"), ("xdist", "tests in one process"),
                   ("pytest_timeout", "no limit per test"), ("liger_kernel", "no liger rows"),
                   ("cut_cross_entropy", "no cce rows"), ("transformers", "no hf_trainer rows")):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '')}".rstrip())
    except Exception as err:  # noqa: BLE001
        missing.append(f"{name} ({role}: {type(err).__name__})")
line = "load check: " + (f"MISSING {'; '.join(missing)}" if missing else "ok: every library loads, every import works")
print(line + (f"; {'; '.join(notes)}" if notes else ""))
PY
env_status=${PIPESTATUS[0]}
load_line="$(grep '^load check:' "${out}/env.txt" | tail -1)"
has_gpu="$("${py}" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)"
pack

# The tests stage's pytest options: in parallel and a limit per test where the plugins are there. The GPU tests
# whose every case compiles Triton kernels anew run a case per code path (CODEX_ML_GPU_CHECK_QUICK; pytest by
# itself runs them all).
export CODEX_ML_GPU_CHECK_QUICK=1
pytest_opts=(-p no:cacheprovider -rfEs)
grep -q '^xdist ' "${out}/env.txt" && pytest_opts+=(-n "$(( $(nproc) > 8 ? 8 : $(nproc) ))")
grep -q '^pytest_timeout' "${out}/env.txt" && pytest_opts+=(--timeout=90)

if (( env_status == 0 )) && [[ "${has_gpu}" != 1 ]]; then
  echo "== no CUDA device: dry run (imports, test collection, each stage at its smallest size)"
  preset=quick
  "${py}" - <<'PY' 2>&1 | tee "${out}/dry_run.log"
import importlib
import importlib.util
import pkgutil

import benchmarks.train_bench
import codex_ml
import codex_ml.kernels

names = [m.name for m in pkgutil.walk_packages(codex_ml.__path__, "codex_ml.")
         if importlib.util.find_spec(m.name).origin.endswith(".py")]  # not the compiled libraries
names += ["benchmarks.bench_train"] + ["benchmarks.train_bench." + m.name
                                       for m in pkgutil.iter_modules(benchmarks.train_bench.__path__)]
for name in names:
    importlib.import_module(name)
print(f"imported {len(names)} modules")
PY
  dry_status=${PIPESTATUS[0]}
  # --collect-only with the tests stage's options (the plugins parse them) in one process: every GPU test is found.
  collect_opts=("${pytest_opts[@]}" -q)
  grep -q '^xdist ' "${out}/env.txt" && collect_opts+=(-n 0)
  (cd "${tree}" && "${py}" -m pytest "${collect_opts[@]}" --collect-only "${gpu_tests[@]}") \
    > "${out}/gpu_tests.log" 2>&1
  collect_status=$?
  tail -1 "${out}/gpu_tests.log"
  echo "dry run: imports $( (( dry_status == 0 )) && echo ok || echo FAILED)  " \
       "gpu tests collected $( (( collect_status == 0 )) && echo ok || echo FAILED)"
  (( dry_status || collect_status )) && build_status=1
fi

# Each stage: its budget in seconds of the default 540 s deadline (a longer deadline lengthens them alike), cut to
# what is left of the deadline less a reserve for the summary, and the least it may run with; below that it is
# skipped. The dry run's CPU takes longer over the quick sizes than the GPU over its own: twice the budget.
declare -A budget=([tests]=150 [bench_attention]=90 [bench_linear_cross_entropy]=75 [bench_layers]=45
                   [tune_attention]=60 [bench_train]=75)
reserve=15 least=30 scale=1
[[ "${preset}" == quick ]] && scale=2
stages=("${@:2}")
(( ${#stages[@]} )) || stages=(tests bench_attention bench_linear_cross_entropy bench_layers tune_attention bench_train)
(( env_status == 0 )) || stages=()
stage_status=0
for stage in "${stages[@]}"; do
  if [[ -z "${budget[${stage}]:-}" ]]; then
    echo "unknown stage ${stage}"; stage_status=1; continue
  fi
  left=$(( deadline - SECONDS - reserve ))
  share=$(( scale * budget[${stage}] * deadline / 540 ))
  limit=$(( left < share ? left : share ))
  if (( limit < least )); then
    echo "${stage}  SKIPPED (${SECONDS} s of the ${deadline} s used; run it by name: tools/gpu_check.sh gpu ${stage})" \
      | tee -a "${out}/stages.txt"
    continue
  fi
  echo "== ${stage} (preset ${preset}, at most ${limit} s)"
  start=${SECONDS}
  json="${out}/${stage}.json" log="${out}/${stage}.log"
  rm -f "${json}"
  case "${stage}" in
    tests)
      if [[ "${preset}" == quick ]]; then
        echo "collected only (no CUDA device)" > "${log}"; rc=0
      else
        (cd "${tree}" && timeout "${limit}" "${py}" -m pytest "${pytest_opts[@]}" -v "${gpu_tests[@]}") > "${log}" 2>&1
        rc=$?
      fi ;;
    tune_attention)
      quick=() && [[ "${preset}" == quick ]] && quick=(--quick)
      TRITON_INTERPRET=$( [[ "${preset}" == quick ]] && echo 1 || echo 0) timeout "${limit}" "${py}" \
        tools/tune_attention.py "${quick[@]}" --json="${json}" > "${log}" 2>&1
      rc=$? ;;
    bench_train)
      steps=40 && [[ "${preset}" == quick ]] && steps=4
      (cd "${tree}" && timeout "${limit}" "${py}" -m benchmarks.bench_train --preset="${preset}" --steps="${steps}" \
        --json="${json}") > "${log}" 2>&1
      rc=$? ;;
    *)
      timeout "${limit}" "${py}" -m "codex_ml.kernels.bench.${stage}" --preset="${preset}" --json="${json}" \
        > "${log}" 2>&1
      rc=$? ;;
  esac
  rows="$("${py}" -c 'import json, sys; print(len(json.load(open(sys.argv[1]))["rows"]))' "${json}" 2>/dev/null \
         || echo 0) rows"
  case "${rc}" in
    0) state=ok ;;
    124) state="STOPPED at its ${limit} s budget" ;;
    *) state="FAILED (exit ${rc})"; stage_status=1 ;;
  esac
  if [[ "${stage}" == tests ]]; then  # counted from pytest -v's lines: also when the stage was stopped
    rows="$(grep -c ' PASSED ' "${log}") passed, $(grep -cE ' (FAILED|ERROR) ' "${log}") failed, \
$(grep -c ' SKIPPED ' "${log}") skipped"
    [[ "${preset}" == quick ]] && rows="collected only"
  fi
  echo "${stage}  ${state}  $(( SECONDS - start )) s  ${rows}" | tee -a "${out}/stages.txt"
  if [[ "${state}" != ok ]]; then
    grep -E "^(FAILED|ERROR) |Error|error:" "${log}" | head -8 | cut -c1-200
    tail -5 "${log}" | cut -c1-200
  fi
  pack
done

{
  echo "== summary (${SECONDS} s of the ${deadline} s deadline)"
  "${py}" tools/gpu_summary.py "${out}"
  echo "${load_line}"
  [[ -f "${out}/stages.txt" ]] && cat "${out}/stages.txt"
  [[ -f "${out}/tests.log" ]] && grep -E "^(FAILED|ERROR) " "${out}/tests.log" | head -20 | cut -c1-200
  [[ -f "${out}/tests.log" ]] && echo "tests: $(tail -n 1 "${out}/tests.log")"
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw,pstate --format=csv 2>/dev/null
} > "${out}/summary.txt"
pack
[[ -n "${OUT:-}" ]] && cp "${out}/summary.txt" "${OUT}/summary.txt"
cat "${out}/summary.txt"
exit $(( env_status || build_status || stage_status ))
