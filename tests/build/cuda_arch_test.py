"""Every CUDA library built by the cuda_library macro carries sm_80 and sm_90 code and compute_90 PTX."""

import ctypes
import subprocess
from pathlib import Path

import pytest
import triton

import codex_ml.kernels

# cuobjdump ships inside triton's wheel, so the check needs nothing from the machine.
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
# codex_ml/kernels/<op>/lib<name>.so; libcodex_onednn_gemm.so is a C++ CPU library (oneDNN products), not CUDA.
LIBRARIES = sorted(lib for lib in Path(codex_ml.kernels.__path__[0]).glob("*/lib*.so")
                   if lib.name != "libcodex_onednn_gemm.so")


def test_cuda_libraries_are_packaged():
    assert any(lib.name == "libcodex_cuda_device.so" for lib in LIBRARIES), LIBRARIES


@pytest.mark.parametrize("library", LIBRARIES, ids=lambda p: p.name)
def test_library_has_cubins_for_sm80_and_sm90(library):
    elf = subprocess.run([CUOBJDUMP, "--list-elf", library], capture_output=True, text=True, check=True).stdout
    assert ".sm_80.cubin" in elf and ".sm_90.cubin" in elf, elf
    ptx = subprocess.run([CUOBJDUMP, "--list-ptx", library], capture_output=True, text=True, check=True).stdout
    assert ".sm_90.ptx" in ptx, ptx


def test_library_loads_without_a_gpu():
    lib = ctypes.CDLL(str(Path(codex_ml.kernels.__path__[0]) / "common" / "libcodex_cuda_device.so"))
    assert lib.codex_cuda_runtime_version() >= 12000
    # Without a GPU the runtime reports an error code (negative); on a GPU machine, the device count.
    count = lib.codex_cuda_device_count()
    assert count != 0
