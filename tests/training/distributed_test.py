"""Two CPU processes under torchrun (gloo on 127.0.0.1) match one process with the same global batch.

Tolerance: the per-step losses agree to rel 1e-5 and the final weights to atol 1e-5. The two runs see
the same rows; only the order of floating-point reductions differs (the mean over ranks, DDP's gradient
all-reduce), which moves float32 results by a few ulps per step. Dropout is off, as per-rank dropout
streams legitimately differ from the single process's.
"""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from standins import make_trainer

from codex_ml.checkpoint import latest_valid_checkpoint, load_model_state

HERE = Path(__file__).absolute().parent
OPTIONS = {"max_steps": 6, "batch_size": 4, "dropout": 0.0, "checkpoint_every": 3, "eval_every": 3}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    single_dir, ddp_dir = tmp_path / "single", tmp_path / "ddp"
    single = make_trainer(single_dir, **OPTIONS).fit(resume="never")

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), *sys.path]), GLOO_SOCKET_IFNAME="lo",
               OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
               str(HERE / "train_standin_main.py"), str(ddp_dir), json.dumps(OPTIONS)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(re.findall(r"STATUS finished 6 rank=(\d)\n", proc.stdout)) == ["0", "1"], proc.stdout

    lines = [json.loads(line) for line in (ddp_dir / "metrics.ndjson").read_text().splitlines()]
    ddp_losses = {r["step"]: r["loss"] for r in lines if r["split"] == "train"}
    assert sorted(ddp_losses) == list(range(1, 7))  # rank 0 alone logged: one record per step
    for step, loss in single.train_losses.items():
        assert ddp_losses[step] == pytest.approx(loss, rel=1e-5)
    ddp_val = [r for r in lines if r["split"] == "val"][-1]
    assert ddp_val["loss"] == pytest.approx(single.val_metrics["loss"], rel=1e-5)

    a = load_model_state(latest_valid_checkpoint(single_dir))
    b = load_model_state(latest_valid_checkpoint(ddp_dir))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-5)
    data_state = json.loads((latest_valid_checkpoint(ddp_dir) / "data_state.json").read_text())
    assert len(data_state["ranks"]) == 2  # each rank's data position is stored for resume
