"""A real `mlflow server` on a loopback port against a run's store: the run's metrics read through its REST API
equal metrics.ndjson."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from readers import ndjson
from standins import make_trainer

STARTUP_LIMIT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


@pytest.fixture
def server(tmp_path):
    """Starts `mlflow server` on 127.0.0.1:<free port> against a finished run's store; yields (run_dir, base URL)."""
    run_dir = tmp_path / "run"
    make_trainer(run_dir, max_steps=5, eval_every=2, mlflow=True).fit()
    port = _free_port()
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    command = [str(mlflow_cli)] if mlflow_cli.is_file() else [sys.executable, "-m", "mlflow"]
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true",
               PYTHONPATH=os.pathsep.join(sys.path))
    process = subprocess.Popen([*command, "server", "--backend-store-uri", f"sqlite:///{run_dir / 'mlflow.db'}",
                                "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                               stdout=open(tmp_path / "server.log", "w"), stderr=subprocess.STDOUT, env=env,
                               start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_LIMIT_S
        while True:
            assert process.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "mlflow server did not answer in time"
            time.sleep(0.5)
        yield run_dir, base
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_metrics_through_the_rest_api_equal_metrics_ndjson(server):
    run_dir, base = server
    experiment = _get(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=codex_ml")["experiment"]
    (run,) = _get(f"{base}/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment["experiment_id"]]})["runs"]
    assert run["info"]["run_name"] == "run" and run["info"]["status"] == "FINISHED"
    run_id = run["info"]["run_id"]
    for split, names in (("train", ("loss", "lr", "grad_norm", "tokens")), ("val", ("loss", "perplexity"))):
        records = ndjson(run_dir, split)
        for name in names:
            history = _get(f"{base}/api/2.0/mlflow/metrics/get-history?run_id={run_id}&metric_key={split}/{name}")
            served = {m["step"]: m["value"] for m in history["metrics"]}
            assert served == {step: r[name] for step, r in records.items()}, (split, name)
    assert list(ndjson(run_dir, "val")) == [2, 4, 5]
