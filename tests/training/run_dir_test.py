"""The train command's run directory (configs/smoke.gin, shortened). Two commands started together on one
--run_dir: one trains, the other is refused naming it; without --run_dir both train, each into its own new
directory. Ctrl-C during data preparation exits 130 with one line, leaving nothing half-written."""

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from codex_ml._files import LockFile
from codex_ml.checkpoint import RunDirLock, latest_valid_checkpoint
from codex_ml.training import ProcessInfo
from codex_ml.training.run_dir import new_run_dir, run_dir_lock

SHORT = ("Trainer.max_steps = 6", "Trainer.eval_every = 0", "Trainer.checkpoint_every = 3", "Trainer.mlflow = False",
         "train.sample_tokens = 4")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _start(cwd: Path, cache: Path, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), PYTHONUNBUFFERED="1")  # each line as printed
    env.pop("BUILD_WORKING_DIRECTORY", None)
    bindings = [f"--gin_bindings={b}" for b in (*SHORT, f"train.cache_dir = '{cache}'")]
    return subprocess.Popen([sys.executable, "-m", "codex_ml.cli.train", "--gin_file=configs/smoke.gin", *bindings,
                             *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(procs: list[subprocess.Popen]) -> list[tuple[int, str, str]]:
    outputs = [p.communicate(timeout=300) for p in procs]
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]


def test_a_second_run_on_the_same_run_dir_is_refused_naming_the_first(tmp_path, cache):
    procs = [_start(tmp_path, cache, "--run_dir=runs/shared") for _ in range(2)]
    results = _finish(procs)
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], [(code, err[-2000:]) for code, _, err in results]
    winner = next(p for p, (code, _, _) in zip(procs, results) if code == 0)
    refused_err = next(err for code, _, err in results if code == 2)
    assert "Traceback" not in refused_err
    lines = refused_err.strip().splitlines()
    assert len(lines) == 1, refused_err  # one paragraph
    holder = rf"\(pid {winner.pid} host {re.escape(socket.gethostname())}\)"
    assert re.search(rf"runs/shared is in use by another run {holder}", lines[0]), lines[0]
    assert "choose another --run_dir" in lines[0]
    assert latest_valid_checkpoint(tmp_path / "runs" / "shared").name == "step_00000006"


def test_runs_without_run_dir_train_into_different_directories(tmp_path, cache):
    results = _finish([_start(tmp_path, cache) for _ in range(2)])
    assert [code for code, _, _ in results] == [0, 0], [err[-2000:] for _, _, err in results]
    named = {re.search(r"^Run directory: (.+)$", out, re.M).group(1) for _, out, _ in results}
    made = {str(p) for p in (tmp_path / "runs").iterdir()}
    assert len(named) == 2 and named == made, (named, made)
    for directory in made:
        assert re.fullmatch(r"smoke-\d{8}-\d{6}-[0-9a-f]{6}", Path(directory).name)
        assert latest_valid_checkpoint(directory).name == "step_00000006"


def test_new_run_dirs_of_the_same_second_differ(tmp_path):
    made = [new_run_dir(tmp_path, "smoke") for _ in range(50)]
    assert len(set(made)) == 50 and all(p.is_dir() for p in made)


def test_the_lock_is_shared_within_a_process_and_refuses_another(tmp_path):
    process = ProcessInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    lock_file = LockFile(tmp_path / RunDirLock.FILE)
    with run_dir_lock(tmp_path, process):
        with run_dir_lock(tmp_path, process):  # the CLI's lock, then Trainer.fit's inside it
            pass
        assert lock_file.held_elsewhere()  # still held after the inner block
        other = subprocess.run([sys.executable, "-c", "import sys; from codex_ml.checkpoint import RunDirLock; "
                                "RunDirLock(sys.argv[1]).acquire()", str(tmp_path)],
                               env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
                               capture_output=True, text=True, timeout=120)
        assert other.returncode != 0 and "RunDirLocked" in other.stderr and f"pid {os.getpid()}" in other.stderr
    with run_dir_lock(tmp_path, process):  # released at the end of the outer block
        pass
    assert not lock_file.held_elsewhere()


def test_ctrl_c_during_data_preparation_exits_130_leaving_nothing_half_written(tmp_path):
    cache = tmp_path / "fresh_cache"  # the tokenizer is trained: data preparation takes a while
    proc = _start(tmp_path, cache, "--run_dir=runs/interrupted")
    for line in proc.stdout:  # the corpus is read; the tokenizer and shards are being built
        if line.startswith("Corpus:"):
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert err.strip().splitlines() == ["Interrupted (Ctrl-C): nothing half-written was kept (complete cache entries "
                                        "and checkpoints stay); run the same command again to go on."], err
    assert not (tmp_path / "runs" / "interrupted").exists()  # made for this run, which never started
    assert not [p for p in cache.rglob("*") if p.name.startswith(".tmp-")]
    assert not list(cache.glob("shards/*/manifest.json"))  # it was stopped before the shards were complete
