#!/usr/bin/env bash
# GPU check, for a machine with an NVIDIA GPU (no Bazel needed there; its own python3 with torch and triton).
# Builds the CUDA libraries with nvcc (same flags as tools/cuda.bzl), assembles codex_ml the way
# Bazel does (python/codex_ml + kernels/<op>/ under codex_ml.kernels.<op>, _version.py from tools/version.bzl),
# runs the GPU tests and the kernel benchmarks, and prints a short table last. Full logs and JSON
# go to GPU_CHECK_OUT (default /tmp/gpu_check: a later call on the same warm machine adds to them, and
# its summary covers both), packed into $OUT/gpu_check.tgz when OUT is set. Wheels in .whl/ are installed first
# (tools/gpu_wheels.sh fetches liger-kernel there, for the comparisons, on a machine with network access).
#   usage: tools/gpu_check.sh [quick|gpu [stage ...]]   (default gpu: the benchmark presets' GPU sizes;
#          stages: tests bench_linear_cross_entropy bench_attention tune_attention bench_layers bench_train,
#          default all)
#   env:   PYTHON (default python3), NVCC (default nvcc, else /usr/local/cuda/bin/nvcc; "none" skips the CUDA
#          build), GPU_CHECK_DEADLINE (seconds for the whole run, default 540, so that it fits a 10-minute job
#          limit; each stage gets what is left, a stage with under 45 s left is skipped, the summary always
#          runs), GPU_CHECK_ARCHS (default 90: sm_90 code and compute_90 PTX; sm_80 is checked by the CPU suite)
# Without a CUDA device it makes a dry run: the same assembly, every module of the op API, the
# kernels and the benchmarks imported, the GPU tests collected (they skip), no benchmark run.
# tests/build/gpu_check_test.py runs that dry run in the CPU suite, so the plumbing stays working.
set -uo pipefail
cd "$(dirname "$0")/.."
preset="${1:-gpu}"
py="${PYTHON:-python3}"
nvcc="${NVCC:-nvcc}"
if [[ "${nvcc}" == nvcc ]] && ! command -v nvcc > /dev/null && [[ -x /usr/local/cuda/bin/nvcc ]]; then
  nvcc=/usr/local/cuda/bin/nvcc
fi
deadline="${GPU_CHECK_DEADLINE:-540}"
archs="${GPU_CHECK_ARCHS:-90}"
# Seconds a stage may run: its own cap, or what is left of the deadline less a margin for the summary.
stage_limit() {
  local left=$(( deadline - SECONDS_TOTAL - 25 ))
  (( left < $1 )) && echo "${left}" || echo "$1"
}
SECONDS_TOTAL=0
start_time=$(date +%s)
elapsed() { SECONDS_TOTAL=$(( $(date +%s) - start_time )); }
# Logs and JSON rows go to GPU_CHECK_OUT. When OUT names a directory (one a batch job collects), the script keeps
# there one archive of them, gpu_check.tgz, rewritten after every stage (a run stopped at its time limit still
# leaves what it did), and summary.txt at the end: two files, however many stages ran.
out="${GPU_CHECK_OUT:-/tmp/gpu_check}"
mkdir -p "${out}"
rm -f "${out}/skipped.txt"
pack() {
  [[ -n "${OUT:-}" ]] || return 0
  tar czf "${OUT}/gpu_check.tgz.part" -C "${out}" . && mv "${OUT}/gpu_check.tgz.part" "${OUT}/gpu_check.tgz"
}
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
export TRITON_DEFAULT_FP_FUSION=1

tree="$(mktemp -d)"
trap 'rm -rf "${tree}"' EXIT
# -L: plain copies, never links into the sources. A Bazel runfiles tree (tests/build/gpu_check_test.py)
# also holds Bazel's outputs under python/codex_ml: drop them, so the tree is built from sources alone.
cp -rL python/codex_ml/. "${tree}/codex_ml/"
rm -rf "${tree}/codex_ml/kernels" "${tree}/codex_ml/_version.py"
mkdir -p "${tree}/codex_ml/kernels"
cp -L kernels/__init__.py "${tree}/codex_ml/kernels/"
for src in kernels/*/*.py; do  # each op's Triton module and package, and the kernel benchmarks
  mkdir -p "${tree}/codex_ml/$(dirname "${src}")" && cp -L "${src}" "${tree}/codex_ml/${src}"
done
cp -rL benchmarks "${tree}/benchmarks"  # bench_train: not part of the package
find "${tree}" -name __pycache__ -prune -exec rm -rf {} +
version="$(sed -n 's/^VERSION = "\(.*\)"$/\1/p' tools/version.bzl)"
echo "__version__ = \"${version}\"  # generated from tools/version.bzl" > "${tree}/codex_ml/_version.py"

if compgen -G ".whl/*.whl" > /dev/null; then
  echo "== installing carried wheels: $(cd .whl && echo *.whl)"
  "${py}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "${tree}/site" .whl/*.whl \
    || echo "FAILED to install the wheels in .whl/"
fi
export PYTHONPATH="${tree}:${tree}/site${PYTHONPATH:+:${PYTHONPATH}}"

echo "== building CUDA libraries"
build_status=0 build_label=ok
# Built once per version of the sources (and of this script): a warm machine keeps the git-ignored .gpu_build/.
cache=".gpu_build/$( (cat kernels/*/*.cu kernels/*/*.h tools/gpu_check.sh; echo "${archs}") \
  | sha256sum | cut -c1-16)"
if [[ "${nvcc}" == none ]]; then
  echo "skipped (NVCC=none)"; build_label=skipped
elif [[ -d "${cache}" ]]; then
  cp -r "${cache}"/kernels "${tree}/codex_ml/" && echo "reused $(cd "${cache}" && echo kernels/*/*.so) from ${cache}"
else
  for cu in kernels/*/*.cu; do  # in parallel: the libraries are independent
    name="$(basename "${cu}" .cu)"
    lib="${tree}/codex_ml/$(dirname "${cu}")/libcodex_${name}.so"
    [[ "${name}" == device_info ]] && lib="${tree}/codex_ml/$(dirname "${cu}")/libcodex_cuda_device.so"
    gencode=()
    for arch in ${archs}; do gencode+=("-gencode=arch=compute_${arch},code=sm_${arch}"); done
    last="${archs##* }"
    gencode+=("-gencode=arch=compute_${last},code=compute_${last}")
    "${nvcc}" -O3 -std=c++17 -Xcompiler -fPIC -I. --expt-relaxed-constexpr -shared --threads 0 "${gencode[@]}" \
      -Xptxas -v "${cu}" -o "${lib}" > "${out}/nvcc_${name}.log" 2>&1 &
  done
  wait
  for cu in kernels/*/*.cu; do
    name="$(basename "${cu}" .cu)"
    lib="$(dirname "${cu}")/libcodex_${name}.so"
    [[ "${name}" == device_info ]] && lib="$(dirname "${cu}")/libcodex_cuda_device.so"
    if [[ -f "${tree}/codex_ml/${lib}" ]]; then
      echo "built ${lib}"
    else
      echo "FAILED to build ${cu} (see nvcc_${name}.log)"; tail -20 "${out}/nvcc_${name}.log"
      build_status=1 build_label=FAILED
    fi
  done
  if (( build_status == 0 )); then
    mkdir -p "${cache}" && (cd "${tree}/codex_ml" && cp --parents kernels/*/lib*.so "${OLDPWD}/${cache}/")
    # Also in the archive: unpacked into .gpu_build/ of a later checkout, they spare that run the build.
    mkdir -p "${out}/${cache}" && cp -r "${cache}"/kernels "${out}/${cache}/"
  fi
fi
elapsed
echo "   (build and set-up: ${SECONDS_TOTAL} s of the ${deadline} s deadline)"

echo "== environment"
"${py}" - <<'PY' 2>&1 | tee "${out}/env.txt"
import importlib
import torch
import triton
import codex_ml
device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
print(f"codex_ml {codex_ml.__version__} from {codex_ml.__path__[0]}")
print(f"torch {torch.__version__}  triton {triton.__version__}  {device}")
for name in ("liger_kernel", "transformers", "matplotlib"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '(no version)')}")
    except Exception as err:  # noqa: BLE001
        print(f"{name} not importable: {err}")
PY
env_status=${PIPESTATUS[0]}
has_gpu="$("${py}" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)"

# The tests run from plain copies too (in a runfiles tree they are links, whose folders pytest can't import from).
cp -rL tests "${tree}/tests"
find "${tree}/tests" -name __init__.py -empty -delete  # Bazel's runfiles add them; the test folders are no packages
mapfile -t gpu_tests < <(cd "${tree}" && ls tests/*/*gpu_test.py 2>/dev/null)
if [[ "${has_gpu}" != 1 ]]; then
  echo "== no CUDA device: dry run"
  "${py}" - <<'PY' 2>&1 | tee "${out}/dry_run.log"
import importlib
import importlib.util
import pkgutil
import codex_ml.kernels
import codex_ml.ops
names = ["codex_ml.ops." + m.name for m in pkgutil.iter_modules(codex_ml.ops.__path__)]
names += [m.name for m in pkgutil.walk_packages(codex_ml.kernels.__path__, "codex_ml.kernels.")
          if importlib.util.find_spec(m.name).origin.endswith(".py")]  # not the compiled libraries
import benchmarks.train_bench
names += ["benchmarks.bench_train"] + ["benchmarks.train_bench." + m.name
                                       for m in pkgutil.iter_modules(benchmarks.train_bench.__path__)]
for name in names:
    importlib.import_module(name)
print(f"imported {len(names)} modules")
PY
  dry_status=${PIPESTATUS[0]}
  (cd "${tree}" && "${py}" -m pytest -q -p no:cacheprovider --collect-only "${gpu_tests[@]}") 2>&1 | tee "${out}/gpu_tests.log" | tail -3
  collect_status=${PIPESTATUS[0]}
  echo "dry run: environment $([[ ${env_status} == 0 ]] && echo ok || echo FAILED)  " \
       "imports $([[ ${dry_status} == 0 ]] && echo ok || echo FAILED)  " \
       "gpu tests collected $([[ ${collect_status} == 0 ]] && echo ok || echo FAILED)  cuda build ${build_label}"
  pack
  exit $(( env_status || dry_status || collect_status || build_status ))
fi

# Stages (all by default; name some to rerun only those): tests, each benchmark, bench_train. Each has a time
# limit, so that one that hangs leaves the rest of the deadline to the others.
stages=("${@:2}")
# By default in order of importance, so that a deadline cuts the least needed: correctness, the loss and
# attention benchmarks, the end-to-end run, then the tile sizes and the layer ops.
(( ${#stages[@]} )) || stages=(tests bench_linear_cross_entropy bench_attention bench_train tune_attention bench_layers)
test_status=0
for stage in "${stages[@]}"; do
  SECONDS=0
  elapsed
  cap=240
  [[ "${stage}" == tests ]] && cap=330
  limit="$(stage_limit "${cap}")"
  if (( limit < 45 )); then
    echo "== ${stage}: SKIPPED (${SECONDS_TOTAL} s of the ${deadline} s deadline used; run it by name next time)" \
      | tee -a "${out}/skipped.txt"
    continue
  fi
  case "${stage}" in
    tests)  # one pytest per file, all at once (Triton's compiles are CPU work), each with its own time limit
      echo "== GPU tests (each file limited to ${limit} s)"
      # The files run at once (Triton's compiles are CPU work): the machine's cores shared among them.
      threads=$(( $(nproc) / (${#gpu_tests[@]} > 0 ? ${#gpu_tests[@]} : 1) ))
      (( threads > 0 )) || threads=1
      for t in "${gpu_tests[@]}"; do
        (cd "${tree}" && OMP_NUM_THREADS="${threads}" timeout "${limit}" "${py}" -m pytest -q -p no:cacheprovider \
          -rfEs "${t}" > "${out}/$(basename "${t}" .py).log" 2>&1; echo $? > "${out}/$(basename "${t}" .py).rc") &
      done
      wait
      : > "${out}/gpu_tests.log"
      for t in "${gpu_tests[@]}"; do
        name="$(basename "${t}" .py)" rc="$(cat "${out}/${name}.rc")"
        (( rc == 0 )) || test_status=1
        echo "${t}: $(tail -n 1 "${out}/${name}.log")$( (( rc == 124 )) && echo " (TIMED OUT at ${limit} s)")" \
          | tee -a "${out}/gpu_tests.log"
        (( rc == 0 )) || grep -E "^(FAILED|ERROR) " "${out}/${name}.log" | head -5 | cut -c1-200
      done ;;
    tune_attention)  # the Triton attention kernels' tile sizes and launch options, checked and timed
      echo "== tune_attention"
      timeout "${limit}" "${py}" tools/tune_attention.py --json="${out}/tune_attention.json" > "${out}/tune_attention.log" 2>&1 \
        || { echo "FAILED tune_attention"; tail -20 "${out}/tune_attention.log"; } ;;
    bench_train)  # end to end: codex_ml's Trainer vs the HF Trainer vs a plain loop, 40 steps
      [[ "${preset}" == gpu ]] || continue
      echo "== bench_train (--preset=gpu --steps=40)"
      timeout "${limit}" "${py}" -m benchmarks.bench_train --preset=gpu --steps=40 --json="${out}/bench_train.json" \
        > "${out}/bench_train.log" 2>&1 || { echo "FAILED bench_train"; tail -20 "${out}/bench_train.log"; } ;;
    bench_*)
      echo "== ${stage} (--preset=${preset})"
      timeout "${limit}" "${py}" -m "codex_ml.kernels.bench.${stage}" --preset="${preset}" --json="${out}/${stage}.json" \
        > "${out}/${stage}.log" 2>&1 || { echo "FAILED ${stage}"; tail -20 "${out}/${stage}.log"; } ;;
    *) echo "unknown stage ${stage}"; test_status=1; continue ;;
  esac
  echo "   (${stage}: ${SECONDS} s)"
  pack
done

echo "== summary"
{
  "${py}" tools/gpu_summary.py "${out}"
  echo "cuda build: ${build_label}"
  [[ -f "${out}/gpu_tests.log" ]] && cat "${out}/gpu_tests.log"
  [[ -f "${out}/skipped.txt" ]] && cat "${out}/skipped.txt"
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw,pstate --format=csv 2>/dev/null
} | tee "${out}/summary.txt"
pack
[[ -n "${OUT:-}" ]] && cp "${out}/summary.txt" "${OUT}/summary.txt"
exit $(( build_status || test_status ))
