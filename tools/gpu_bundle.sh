#!/usr/bin/env bash
# Builds the bundle tools/gpu_check.sh runs from on a GPU machine (no Bazel, no network there): one folder,
# .gpu_bundle/ by default (git-ignored), holding
#   codex_ml/     the package as the GPU machine imports it: python/codex_ml, kernels/<op>/ as codex_ml.kernels.<op>
#                 (the kernel benchmarks included), _version.py from tools/version.bzl, and the compiled libraries:
#                 the CUDA libraries (sm_80 and sm_90 code, compute_90 PTX: tools/cuda.bzl's flags, the wheel's)
#                 and the C++ CPU extensions (tools/gpu_check.sh drops those that do not load under the machine's
#                 torch);
#   benchmarks/   bench_train (not part of the package);
#   wheels/       what the GPU machine's python3 lacks, pinned with hashes in tools/gpu_wheels.txt (gin-config for
#                 the trainer, liger-kernel and cut-cross-entropy for the benchmarks' comparisons), downloaded by
#                 tools/gpu_wheels.sh;
#   BUNDLE        what it holds and was built from.
# The working tree travels with it: the script prints both sizes and fails when they reach 64 MiB together.
#   usage: tools/gpu_bundle.sh [--out DIR] [--libs bazel|nvcc|none|DIR] [--no-wheels]
#     --libs bazel  (default) tools/bazel build the CUDA libraries and the CPU extensions here
#     --libs nvcc   the CUDA libraries with plain nvcc and the same flags (a machine without Bazel; NVCC names
#                   the compiler); no CPU extensions
#     --libs DIR    the libraries already built, as DIR/kernels/<op>/lib*.so and cpu.so (a Bazel runfiles tree)
#     --no-wheels   no download: BUNDLE lists the wheels by name only (for a machine without network access)
set -euo pipefail
cd "$(dirname "$0")/.."
out=.gpu_bundle libs=bazel wheels=1
while (( $# )); do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --out=*) out="${1#--out=}"; shift ;;
    --libs) libs="$2"; shift 2 ;;
    --libs=*) libs="${1#--libs=}"; shift ;;
    --no-wheels) wheels=0; shift ;;
    *) echo "gpu_bundle.sh: unknown argument $1 (usage: see the top of tools/gpu_bundle.sh)" >&2; exit 2 ;;
  esac
done
limit=$(( 64 * 1024 * 1024 ))

rm -rf "${out}"
mkdir -p "${out}/codex_ml/kernels"
# -L: plain copies, never links into the sources. A Bazel runfiles tree also holds Bazel's outputs under
# python/codex_ml: drop them, so the package is made from the sources and the libraries chosen below alone.
cp -rL python/codex_ml/. "${out}/codex_ml/"
rm -rf "${out}/codex_ml/kernels" "${out}/codex_ml/_version.py"
mkdir -p "${out}/codex_ml/kernels"
cp -L kernels/__init__.py "${out}/codex_ml/kernels/"
for src in kernels/*/*.py; do  # each op's Triton module and package, and the kernel benchmarks
  mkdir -p "${out}/codex_ml/$(dirname "${src}")" && cp -L "${src}" "${out}/codex_ml/${src}"
done
cp -rL benchmarks "${out}/benchmarks"
rm -rf "${out}/benchmarks/results"  # the committed figures: not needed to run
find "${out}" \( -name __pycache__ -o -name BUILD.bazel -o -name '*.md' \) -prune -exec rm -rf {} +
version="$(sed -n 's/^VERSION = "\(.*\)"$/\1/p' tools/version.bzl)"
echo "__version__ = \"${version}\"  # generated from tools/version.bzl" > "${out}/codex_ml/_version.py"

# The CUDA libraries: lib<name>.so of each kernels/<op>/*.cu (device_info.cu makes libcodex_cuda_device.so).
cuda_lib() {
  local name; name="$(basename "$1" .cu)"
  [[ "${name}" == device_info ]] && name=cuda_device
  echo "$(dirname "$1")/libcodex_${name}.so"
}
gencode=$(grep -o '"-gencode=[^"]*"' tools/cuda.bzl | tr -d '"' | tr '\n' ' ')
copy_libs() {  # $1: a tree holding kernels/<op>/ with the built libraries
  for cu in kernels/*/*.cu; do
    mkdir -p "${out}/codex_ml/$(dirname "${cu}")" && cp -L "$1/$(cuda_lib "${cu}")" "${out}/codex_ml/$(cuda_lib "${cu}")"
  done
  for ext in "$1"/kernels/*/cpu.so "$1"/kernels/common/libcodex_onednn_gemm.so; do
    [[ -f "${ext}" ]] && cp -L "${ext}" "${out}/codex_ml/${ext#"$1"/}"
  done
  return 0
}
case "${libs}" in
  bazel)
    tools/bazel build //kernels:cuda_libraries //kernels:cpu_extensions
    copy_libs "$(tools/bazel info bazel-bin 2>/dev/null)"
    libs_from="tools/bazel build //kernels:cuda_libraries //kernels:cpu_extensions" ;;
  nvcc)
    nvcc="${NVCC:-nvcc}"
    if [[ "${nvcc}" == nvcc ]] && ! command -v nvcc > /dev/null && [[ -x /usr/local/cuda/bin/nvcc ]]; then
      nvcc=/usr/local/cuda/bin/nvcc
    fi
    logs="${out}/nvcc_logs"
    mkdir -p "${logs}"
    for cu in kernels/*/*.cu; do  # in parallel: the libraries are independent
      mkdir -p "${out}/codex_ml/$(dirname "${cu}")"
      # shellcheck disable=SC2086  # gencode: one flag per word
      "${nvcc}" -O3 -std=c++17 -Xcompiler -fPIC -I. --expt-relaxed-constexpr -shared --threads 0 ${gencode} -Xptxas -v \
        "${cu}" -o "${out}/codex_ml/$(cuda_lib "${cu}")" > "${logs}/$(basename "${cu}" .cu).log" 2>&1 &
    done
    wait
    for cu in kernels/*/*.cu; do
      if [[ ! -f "${out}/codex_ml/$(cuda_lib "${cu}")" ]]; then
        echo "FAILED to build ${cu} with ${nvcc}:"; tail -20 "${logs}/$(basename "${cu}" .cu).log"; exit 1
      fi
    done
    libs_from="${nvcc} ${gencode}" ;;
  none) libs_from="none" ;;
  *)
    [[ -d "${libs}" ]] || { echo "gpu_bundle.sh: --libs ${libs}: no such folder" >&2; exit 2; }
    copy_libs "${libs}"
    libs_from="${libs}" ;;
esac

wheel_list=$(grep -v '^#' tools/gpu_wheels.txt | awk 'NF { print $1 }' | tr '\n' ' ')
if (( wheels )); then
  tools/gpu_wheels.sh "${out}/wheels" > /dev/null
fi

{
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$( [[ -n "$(git status --porcelain \
    --untracked-files=no 2>/dev/null)" ]] && echo +dirty)"
  echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "libraries from: ${libs_from}"
  echo "libraries: $(cd "${out}/codex_ml" && find kernels -name '*.so' | sort | tr '\n' ' ')"
  echo "wheels: ${wheel_list}($( (( wheels )) && echo downloaded || echo "listed only"))"
} > "${out}/BUNDLE"

size=$(find "${out}" -type f -printf '%s\n' | awk '{ s += $1 } END { print s + 0 }')
tree=0
if git rev-parse --git-dir > /dev/null 2>&1; then  # what travels beside it: the tracked files
  tree=$(git ls-files -z | xargs -0 stat -c %s 2>/dev/null | awk '{ s += $1 } END { print s + 0 }')
fi
cat "${out}/BUNDLE"
echo "bundle ${out}: $(( size / 1024 )) KiB; with the tracked tree ($(( tree / 1024 )) KiB): \
$(( (size + tree) / 1024 )) KiB of the 65536 KiB a GPU call carries"
if (( size + tree >= limit )); then
  echo "FAILED: the bundle and the tree reach 64 MiB; leave something out" >&2
  exit 1
fi
