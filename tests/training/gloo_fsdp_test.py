"""codex_ml.training.gloo_fsdp, FSDP2's collectives on gloo, against the reduction computed in float64 from every
process's input, in 2 processes: sums and means, odd sizes, buffers reused across calls, outputs poisoned first."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from standins import free_port

from codex_ml.training.gloo_fsdp import GlooAllGather, GlooReduceScatter

WORLD = 2


def _inputs(call: int, rank: int, numel: int) -> torch.Tensor:
    """Process `rank`'s input of the `call`-th collective (each process can make every process's)."""
    return torch.randn(numel, generator=torch.Generator().manual_seed(1000 * call + rank))


def _check_collectives(rank: int, port: int) -> None:
    """In each process (a failure raises there, and start_processes raises it in the test)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        group = dist.group.WORLD
        reduce_scatter, all_gather = GlooReduceScatter(), GlooAllGather()
        outputs = []
        calls = [(1003, dist.ReduceOp.AVG), (1003, dist.ReduceOp.SUM), (17, dist.ReduceOp.AVG)]
        for call, (shard, op) in enumerate(calls):
            reduce_input = reduce_scatter.allocate((shard * WORLD,), dtype=torch.float32, device=torch.device("cpu"))
            output = reduce_scatter.allocate((shard,), dtype=torch.float32, device=torch.device("cpu"))
            output.fill_(float("nan"))
            reduce_input.copy_(_inputs(call, rank, shard * WORLD))
            reduce_scatter(output, reduce_input, group, op)
            everyone = torch.stack([_inputs(call, r, shard * WORLD).double() for r in range(WORLD)])
            expected = everyone.sum(0).view(WORLD, shard)[rank]
            if op == dist.ReduceOp.AVG:
                expected /= WORLD
            outputs.append((output, expected))
        for output, expected in outputs:  # each output is fresh: later calls did not overwrite an earlier one
            torch.testing.assert_close(output.double(), expected, rtol=1e-6, atol=1e-6)
        with pytest.raises(ValueError, match="SUM or AVG"):
            reduce_scatter(output, reduce_scatter.allocate((WORLD,), dtype=torch.float32,
                                                           device=torch.device("cpu")), group, dist.ReduceOp.MAX)
        swapped_input = reduce_scatter.allocate((WORLD,), dtype=torch.float32, device=torch.device("cpu"))
        swapped_output = reduce_scatter.allocate((1,), dtype=torch.float32, device=torch.device("cpu"))
        with pytest.raises(RuntimeError, match="unexpected order"):  # never reduce into the reused input buffer
            reduce_scatter(swapped_input, swapped_output, group, dist.ReduceOp.SUM)

        first = all_gather.allocate((1001 * WORLD,), dtype=torch.float32, device=torch.device("cpu"))
        for call in range(2):
            output = all_gather.allocate((1001 * WORLD,), dtype=torch.float32, device=torch.device("cpu"))
            assert output.data_ptr() == first.data_ptr()  # one buffer, reused
            output.fill_(float("nan"))
            shard = _inputs(call, rank, 1001)
            work = all_gather(output, shard, group)
            assert work is None  # synchronous unless FSDP asks otherwise
            expected = torch.cat([_inputs(call, r, 1001) for r in range(WORLD)])
            torch.testing.assert_close(output, expected, rtol=0, atol=0)
    finally:
        dist.destroy_process_group()


def test_gloo_reduce_scatter_and_all_gather_match_a_float64_reference():
    mp.start_processes(_check_collectives, args=(free_port(),), nprocs=WORLD, start_method="spawn")
