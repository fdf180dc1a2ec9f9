"""The Triton attention kernels as a GPU runs them, compiled ahead of time with no GPU present.

The tensor-core path (DOT_FP32=False) in bf16 at D 64 and 128, with the tiles, warps and stages that _config picks
on sm_80 and on Hopper (sm_90), and pointers 16-byte aligned, as PyTorch allocates them and as Triton specializes
on them at launch (unaligned, no load is vectorized and none is pipelined). Each kernel must fit the chip's shared
memory (sm_80 163 KB, sm_90 227 KB per block), load its tiles asynchronously (cp.async: the pipelined loop) and,
on Hopper, run its products as warpgroup MMAs (wgmma). tools/triton_aot_check.py compiles the specs of aot_specs()
the same way (their options, aligned pointers).
"""

import os

os.environ["TRITON_INTERPRET"] = "0"  # compile the kernels, not interpret them (set before triton is imported)

import pytest  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from codex_ml.kernels.attention import triton as kernels  # noqa: E402

SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
KERNELS = {"fwd": kernels._attn_fwd_kernel, "bwd": kernels._attn_bwd_kernel, "dq": kernels._attn_bwd_dq_kernel}


def _compile(capability: int, d: int, name: str):
    config = kernels._tensor_core_config(capability >= 90, d)
    tiles = "fwd" if name == "fwd" else "bwd"
    fn, signature, constexprs, _ = next(spec for spec in kernels.aot_specs() if spec[0] is KERNELS[name])
    signature = {arg: kind.replace("fp16", "bf16") for arg, kind in signature.items()}
    block_m, block_n = config[tiles]
    aligned = {(i,): [["tt.divisibility", 16]] for i, kind in enumerate(signature.values()) if kind.startswith("*")}
    source = ASTSource(fn, signature, {**constexprs, "D": d, "BLOCK_M": block_m, "BLOCK_N": block_n}, aligned)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options=config[f"{tiles}_opts"])


@pytest.mark.parametrize("name", ["fwd", "bwd", "dq"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("capability", [80, 90])
def test_runtime_configs_fit_and_pipeline(capability, d, name):
    compiled = _compile(capability, d, name)
    ptx = compiled.asm["ptx"]
    assert f".target sm_{capability}" in ptx and compiled.asm["cubin"]
    assert compiled.metadata.shared <= SHARED_MEMORY_LIMIT[capability], compiled.metadata.shared
    assert "cp.async" in ptx, "the tile loads are not pipelined"
    if capability >= 90 and name != "dq":  # the dQ kernel's 32-row tiles are below a warpgroup MMA's 64
        assert "wgmma" in ptx, "Hopper's products are not warpgroup MMAs"
