#!/usr/bin/env bash
# GPU check, for a lent GPU machine (no Bazel there; its own python3 with torch and triton).
# Builds the CUDA libraries with nvcc (same flags as tools/cuda.bzl), assembles codex_ml the way
# Bazel does (python/codex_ml + kernels/ under codex_ml.kernels), runs the GPU tests and the
# kernel benchmarks, and prints a short table last. Full logs and JSON go to $OUT (or /tmp/gpu_out).
#   usage: tools/gpu_check.sh [quick|gpu]     (default gpu: the benchmark presets' GPU sizes)
set -uo pipefail
cd "$(dirname "$0")/.."
preset="${1:-gpu}"
out="${OUT:-/tmp/gpu_out}"
mkdir -p "${out}"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
export TRITON_DEFAULT_FP_FUSION=1

tree="$(mktemp -d)"
mkdir -p "${tree}/codex_ml"
cp -r python/codex_ml/. "${tree}/codex_ml/"
mkdir -p "${tree}/codex_ml/kernels"
cp -r kernels/__init__.py kernels/triton "${tree}/codex_ml/kernels/"
[[ -d kernels/bench ]] && cp -r kernels/bench "${tree}/codex_ml/kernels/"

echo "== building CUDA libraries"
build_status=0
for cu in kernels/cuda/*.cu; do
  name="$(basename "${cu}" .cu)"
  lib="${tree}/codex_ml/kernels/libcodex_${name}.so"
  [[ "${name}" == device_info ]] && lib="${tree}/codex_ml/kernels/libcodex_cuda_device.so"
  if nvcc -O3 -std=c++17 -Xcompiler -fPIC -I. --expt-relaxed-constexpr -shared \
      -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90 \
      -gencode=arch=compute_90,code=compute_90 -Xptxas -v "${cu}" -o "${lib}" \
      > "${out}/nvcc_${name}.log" 2>&1; then
    echo "built ${lib##*/}"
  else
    echo "FAILED to build ${cu} (see nvcc_${name}.log)"; tail -20 "${out}/nvcc_${name}.log"; build_status=1
  fi
done

export PYTHONPATH="${tree}${PYTHONPATH:+:${PYTHONPATH}}"
python3 - <<'PY' | tee "${out}/env.txt"
import torch, triton
print("torch", torch.__version__, "triton", triton.__version__, "device", torch.cuda.get_device_name(0))
PY

echo "== GPU tests"
mapfile -t gpu_tests < <(ls tests/*/*gpu*_test.py 2>/dev/null)
test_status=0
if (( ${#gpu_tests[@]} )); then
  python3 -m pytest -q -p no:cacheprovider -rs "${gpu_tests[@]}" 2>&1 | tee "${out}/gpu_tests.log" | tail -30
  test_status=${PIPESTATUS[0]}
else
  echo "no GPU test files found"; test_status=1
fi

echo "== benchmarks (--preset=${preset})"
for bench in kernels/bench/bench_*.py; do
  name="$(basename "${bench}" .py)"
  python3 "${bench}" --preset="${preset}" --json="${out}/${name}.json" > "${out}/${name}.log" 2>&1 \
    || { echo "FAILED ${name}"; tail -20 "${out}/${name}.log"; }
done

# End to end (issue 8): codex_ml's Trainer vs the HF Trainer vs a plain loop, shortened to 40 steps.
if [[ "${preset}" == gpu ]] && python3 -c "import transformers, matplotlib" 2>/dev/null; then
  python3 -m codex_ml.cli.bench_train --preset=gpu --steps=40 --json="${out}/bench_train.json" \
    > "${out}/bench_train.log" 2>&1 || { echo "FAILED bench_train"; tail -20 "${out}/bench_train.log"; }
fi
echo "== summary"
for bench in kernels/bench/bench_*.py; do
  name="$(basename "${bench}" .py)"
  echo "-- ${name}"; tail -n 25 "${out}/${name}.log"
done
[[ -f "${out}/bench_train.log" ]] && { echo "-- bench_train"; tail -n 8 "${out}/bench_train.log"; }
echo "cuda build: $([[ ${build_status} == 0 ]] && echo ok || echo FAILED)   gpu tests: $(tail -n 1 "${out}/gpu_tests.log" 2>/dev/null)"
exit $(( build_status || test_status ))
