"""Two-process FSDP runs (Trainer.parallelism = 'fsdp', sharded checkpoints) when one process is lost.

- kill -9 of one process while a sharded checkpoint is being written (fsyncs slowed by the fault shim): torchrun
  brings the run down, every checkpoint committed before stays byte for byte, and --resume=auto continues from the
  newest one to the end.
- a process killed (-9) or frozen (SIGSTOP) in the middle of training, the two processes started without torchrun
  (as on two machines, where no launcher stops the survivor): the survivor stops within a bounded time
  (Trainer.collective_timeout_s for the frozen one) with one paragraph on stderr and exit status 1.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import faults
import pytest

from codex_ml.checkpoint import latest_valid_checkpoint, list_checkpoints

STEPS = 7  # checkpoints at steps 3 and 6, and at the end
FSDP = {"Trainer.parallelism": "'fsdp'", "Trainer.collective_timeout_s": "10", "Trainer.max_steps": str(STEPS)}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return faults.prepared_cache(tmp_path_factory.mktemp("fsdp-cache"))


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cwd, launcher, run_dir, cache, *args, env_extra=None, faults_env=None, **overrides):
    command = faults.command(run_dir, cache, *args, **{**FSDP, **overrides})
    env = dict(faults.environment(faults_env), GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", **(env_extra or {}))
    name = f"{run_dir.name}-{time.monotonic_ns()}"
    stdout, stderr = open(cwd / f"{name}.out", "w+"), open(cwd / f"{name}.err", "w+")
    proc = subprocess.Popen([*launcher, *command[1:]], cwd=cwd, env=env, stdout=stdout, stderr=stderr, text=True)
    proc.logs = (stdout, stderr)
    return proc


def _torchrun(cwd, run_dir, cache, *args, faults_env=None):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
                "--master_addr=127.0.0.1", f"--master_port={_free_port()}"]
    return _start(cwd, launcher, run_dir, cache, *args, faults_env=faults_env)


def _rank_pid(launcher_pid, rank):
    """The pid of the torchrun worker of `rank` (a child of the launcher)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == launcher_pid and f"RANK={rank}".encode() in environ:
            return int(stat.parent.name)
    return None


def test_kill_9_of_one_process_mid_save_keeps_the_checkpoints_and_resumes(tmp_path, cache):
    run_dir = tmp_path / "run"
    slow = {"FAULT_SLOW_FSYNC_DIR": str(run_dir / "checkpoints"), "FAULT_SLOW_FSYNC_MS": "40"}
    proc = _torchrun(tmp_path, run_dir, cache, faults_env=slow)

    def second_save():
        saving = any(p.name.startswith(".tmp-step_") for p in faults.temporaries(run_dir / "checkpoints"))
        return saving and bool(list_checkpoints(run_dir))

    assert faults.wait_for(second_save, proc), faults.finish(proc)
    before = faults.committed(run_dir)
    victim = _rank_pid(proc.pid, 1)
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    rc, out, err = faults.finish(proc, timeout=120)
    assert rc != 0, out[-2000:] + err[-3000:]
    assert time.monotonic() - killed_at < 60
    faults.assert_kept(before, run_dir)
    newest = latest_valid_checkpoint(run_dir)
    assert newest is not None

    rc, out, err = faults.finish(_torchrun(tmp_path, run_dir, cache, "--resume=auto"))
    assert rc == 0, out[-2000:] + err[-3000:]
    assert f"Resumed from {newest}" in out
    assert f"Done: finished at step {STEPS}" in out
    assert not faults.temporaries(run_dir / "checkpoints")  # the interrupted save's temporary was removed
    faults.assert_kept(before, run_dir)


@pytest.mark.parametrize("fault", ["SIGKILL", "SIGSTOP"])
def test_a_lost_process_stops_the_other_within_a_bounded_time(tmp_path, cache, fault):
    run_dir, port = tmp_path / "run", _free_port()
    ranks = []
    for rank in (0, 1):
        env = {"RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}
        ranks.append(_start(tmp_path, [sys.executable], run_dir, cache, env_extra=env))
    try:
        assert faults.wait_for(lambda: max(faults.train_steps(run_dir), default=0) >= 4, ranks[0])
        os.kill(ranks[1].pid, getattr(signal, fault))
        lost_at = time.monotonic()
        rc, out, err = faults.finish(ranks[0], timeout=120)
        waited = time.monotonic() - lost_at
    finally:
        ranks[1].kill()
        faults.finish(ranks[1])
    assert rc == 1, out[-2000:] + err[-3000:]
    assert waited < 10 + 30  # Trainer.collective_timeout_s = 10, plus the time to stop
    assert "error: Process 0 of 2: another process of this run died or stopped answering" in err, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert latest_valid_checkpoint(run_dir).name == "step_00000003"
