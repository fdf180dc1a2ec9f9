"""FSDP2's collectives on gloo (training on the CPU).

FSDP2 calls its collectives through two objects a user may replace (FSDPModule.set_custom_all_gather,
set_custom_reduce_scatter). Its defaults suit NCCL; on gloo two of their costs are avoidable:
- gloo's reduce_scatter_tensor copies its input, all-reduces all of it and keeps one part: twice the bytes an
  all-to-all moves, and a fresh copy of every block's gradients;
- every all-gather and reduce-scatter allocates a fresh buffer of a whole block, freed after use: with large
  blocks returned to the system when freed (configure_cpu_allocator under FSDP), each is page-faulted in again.
(Prefetching asynchronously does not help on the CPU: gloo's thread competes with the compute for the cores.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter


class _Buffers:
    """One reused tensor per (size, dtype): a collective's buffer that no one reads once the collective's result
    has been copied out."""

    def __init__(self):
        self._tensors: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}

    def get(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (numel, dtype, device)
        if key not in self._tensors:
            self._tensors[key] = torch.empty(numel, dtype=dtype, device=device)
        return self._tensors[key]

    def holds(self, tensor: torch.Tensor) -> bool:
        return any(tensor.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
                   for t in self._tensors.values())


class GlooAllGather(AllGather):
    """All-gathers into a reused buffer: FSDP copies each all-gather's output out before it issues the next one
    (on the CPU every collective completes before the call returns), so no one reads the previous contents."""

    def __init__(self):
        self._buffers = _Buffers()

    def allocate(self, size: Sequence[int | torch.SymInt], *, dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor:
        return self._buffers.get(int(torch.Size(size).numel()), dtype, device).view(size)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup,
                 async_op: bool = False) -> dist.Work | None:
        return dist.all_gather_into_tensor(output_tensor, input_tensor, group=group, async_op=async_op)


class GlooReduceScatter(ReduceScatter):
    """Reduce-scatter as an all-to-all (each process receives every process's part for its own shard) and a sum:
    (N - 1) / N of the input sent, as a ring reduce-scatter, instead of gloo's all-reduce of all of it."""

    def __init__(self):
        self._inputs, self._received = _Buffers(), _Buffers()
        self._input_next = True

    def allocate(self, size: Sequence[int | torch.SymInt], *, dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor:
        # FSDP asks for the input (the block's gradients, copied in), then for the output, which becomes the
        # sharded gradients and so must be fresh. The input is reused: consumed before the next block's arrives.
        input_next, self._input_next = self._input_next, not self._input_next
        if input_next:
            return self._inputs.get(int(torch.Size(size).numel()), dtype, device).view(size)
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup,
                 op: object, async_op: bool = False) -> None:
        self._input_next = True  # whatever happened before, the next request is the next reduce-scatter's input
        if self._inputs.holds(output_tensor):
            raise RuntimeError("GlooReduceScatter: FSDP asked for its buffers in an unexpected order (the output "
                               "would be the reused input buffer); set Trainer.parallelism = 'ddp' or report it")
        world_size = group.size()
        received = self._received.get(input_tensor.numel(), input_tensor.dtype, input_tensor.device)
        dist.all_to_all_single(received, input_tensor, group=group)
        torch.sum(received.view(world_size, -1), dim=0, out=output_tensor.view(-1))
        if op == dist.ReduceOp.AVG:
            output_tensor.div_(world_size)
        elif op != dist.ReduceOp.SUM:
            raise ValueError(f"GlooReduceScatter reduces by SUM or AVG, not {op}")
