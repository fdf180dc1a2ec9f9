"""Many machines on one: two torchrun launches with --nnodes=2 (one process each, meeting on 127.0.0.1 through the
c10d rendezvous, or the static one with --node_rank) train configs/smoke.gin exactly as one torchrun launch with
--nproc_per_node=2 does.

Both runs have two processes with the same ranks' data, so every reduction is the same sum in the same order: the
per-step losses and the final weights agree bit for bit, with DistributedDataParallel and with FSDP2 (whose
processes each write their shards of every checkpoint). The two "nodes" share one --run_dir, as nodes share a
network filesystem.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from codex_ml.checkpoint import latest_valid_checkpoint, load_model_state
from codex_ml.checkpoint.sharded import is_sharded_checkpoint

STEPS = 6
BINDINGS = [f"Trainer.max_steps = {STEPS}", "Trainer.log_every = 1", "Trainer.eval_every = 0",
            "Trainer.checkpoint_every = 3", "Trainer.mlflow = False"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(cwd: Path, torchrun_args: list[str], run_dir: Path, bindings: list[str]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p), GLOO_SOCKET_IFNAME="lo",
               OMP_NUM_THREADS="1")
    env.pop("BUILD_WORKING_DIRECTORY", None)
    command = [sys.executable, "-m", "torch.distributed.run", *torchrun_args, "-m", "codex_ml.cli.train",
               "--gin_file=configs/smoke.gin", f"--gin_bindings=train.cache_dir = '{cwd / 'cache'}'",
               *(f"--gin_bindings={b}" for b in BINDINGS + bindings), f"--run_dir={run_dir}"]
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(procs: list[subprocess.Popen], timeout: float = 240) -> list[str]:
    """Each launch's output; every launch must exit 0 (all are killed if one does not finish in time)."""
    try:
        outputs = [proc.communicate(timeout=timeout)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-4000:]
    return outputs


def _losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.ndjson").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """One data cache for every run: the first prepares it, the others reuse it."""
    return tmp_path_factory.mktemp("multinode")


_ONE_NODE: dict[str, Path] = {}


def _one_node_run(workdir: Path, parallelism: str, bindings: list[str]) -> Path:
    """The run directory of one torchrun with --nproc_per_node=2 (made once per parallelism)."""
    if parallelism not in _ONE_NODE:
        run_dir = workdir / f"{parallelism}_one_node"
        _finish([_torchrun(workdir, ["--nnodes=1", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                                     f"--master_port={_free_port()}"], run_dir, bindings)])
        _ONE_NODE[parallelism] = run_dir
    return _ONE_NODE[parallelism]


def _node_args(rendezvous: str, node_rank: int, port: int) -> list[str]:
    """torchrun's flags for one of two machines, as docs/training.md ("Many machines") gives them."""
    if rendezvous == "c10d":
        return ["--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
                "--rdzv_id=multinode", "--local_addr=127.0.0.1"]
    return ["--nnodes=2", "--nproc_per_node=1", f"--node_rank={node_rank}", "--master_addr=127.0.0.1",
            f"--master_port={port}"]


@pytest.mark.parametrize("parallelism, rendezvous", [("ddp", "c10d"), ("ddp", "static"), ("fsdp", "c10d")])
def test_two_nodes_train_as_one_node_with_two_processes(workdir: Path, parallelism: str, rendezvous: str):
    bindings = [f"Trainer.parallelism = '{parallelism}'"] if parallelism != "ddp" else []
    one_node = _one_node_run(workdir, parallelism, bindings)
    two_nodes = workdir / f"{parallelism}_two_nodes_{rendezvous}"
    port = _free_port()
    _finish([_torchrun(workdir, _node_args(rendezvous, node_rank, port), two_nodes, bindings) for node_rank in (0, 1)])

    checkpoint = latest_valid_checkpoint(two_nodes)
    trainer_state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert (trainer_state["step"], trainer_state["world_size"]) == (STEPS, 2)
    assert is_sharded_checkpoint(checkpoint) == (parallelism == "fsdp")
    expected = _losses(one_node)
    assert sorted(expected) == list(range(1, STEPS + 1))
    assert _losses(two_nodes) == expected
    a = load_model_state(latest_valid_checkpoint(one_node))
    b = load_model_state(latest_valid_checkpoint(two_nodes))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
