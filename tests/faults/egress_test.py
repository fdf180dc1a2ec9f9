"""train, generate and export reach no other machine: every outbound connection attempt is recorded, and there is
none.

Two recorders watch every command, each in a child process started without the offline and no-telemetry
variables (the library must set what it needs itself):
- a socket guard (egress_guard/sitecustomize.py, first on PYTHONPATH): Python-level connect, connect_ex, sendto,
  create_connection and host name lookups that leave the machine are logged and refused;
- strace -f -e trace=connect, where strace exists and may trace here: every connect(2) of the process tree,
  native code included, whose address is neither loopback nor a Unix socket.
train runs with MLflow on (its telemetry is what could call out); generate runs on the run directory and on the
exported Hugging Face folder (transformers' loading path).
"""

import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys

import faults
import pytest

GUARD = faults.HERE / "egress_guard"
OFFLINE_VARIABLES = ("MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                     "HF_DATASETS_OFFLINE")
CONNECT = re.compile(r'connect\(\d+, \{sa_family=(AF_INET6?), .*?(?:inet_addr\("([^"]+)"\)|inet_pton\(AF_INET6, '
                     r'"([^"]+)")')


def _strace_works(tmp_path):
    """Whether strace can trace a child here (it may be missing, or ptrace may be denied)."""
    if shutil.which("strace") is None:
        return False
    proc = subprocess.run(["strace", "-f", "-e", "trace=connect", "-o", str(tmp_path / "probe.strace"), "true"],
                          capture_output=True, timeout=30)
    return proc.returncode == 0


def _outbound_connects(trace):
    """The connect(2) calls in an strace log whose address is not a loopback one."""
    found = []
    for line in trace.splitlines():
        match = CONNECT.search(line)
        if match:
            address = ipaddress.ip_address(match.group(2) or match.group(3))
            mapped = getattr(address, "ipv4_mapped", None)
            if not (address.is_loopback or (mapped is not None and mapped.is_loopback)):
                found.append(line)
    return found


def _run(tmp_path, name, args, use_strace):
    log = tmp_path / f"{name}.egress"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(GUARD), *sys.path]), CODEX_EGRESS_LOG=str(log))
    env.pop("BUILD_WORKING_DIRECTORY", None)
    for variable in OFFLINE_VARIABLES:
        env.pop(variable, None)
    command = [sys.executable, *args]
    if use_strace:
        command = ["strace", "-f", "-e", "trace=connect", "-o", str(tmp_path / f"{name}.strace"), *command]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=faults.TIMEOUT)
    assert proc.returncode == 0, (name, proc.stdout[-2000:], proc.stderr[-4000:])
    attempts = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    assert not attempts, (name, [(a["call"], a["target"], "".join(a["stack"][-4:])) for a in attempts])
    if use_strace:
        outbound = _outbound_connects((tmp_path / f"{name}.strace").read_text())
        assert not outbound, (name, outbound)
    return proc


def test_the_guard_records_an_outbound_attempt(tmp_path):
    """The recorders themselves: a connection to a documentation address (TEST-NET-1) is seen by both."""
    use_strace = _strace_works(tmp_path)
    script = "\n".join([
        "import socket",
        "def plain_connect(address):",
        "    with socket.socket() as s:",
        "        s.settimeout(0.2)",
        "        s.connect(address)",
        "for connect in (lambda: socket.create_connection(('192.0.2.1', 443), timeout=0.2),",
        "                lambda: plain_connect(('192.0.2.1', 80))):",
        "    try:",
        "        connect()",
        "    except OSError:",
        "        pass",
    ])
    with pytest.raises(AssertionError, match="192.0.2.1"):
        _run(tmp_path, "probe", ["-c", script], use_strace=False)
    if use_strace:
        log = tmp_path / "raw.strace"
        subprocess.run(["strace", "-f", "-e", "trace=connect", "-o", str(log), sys.executable, "-c", script],
                       timeout=60, env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
        assert any("192.0.2.1" in line for line in _outbound_connects(log.read_text())), log.read_text()


def test_train_generate_and_export_make_no_outbound_connection(tmp_path):
    use_strace = _strace_works(tmp_path)
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    train = ["-m", "codex_ml.cli.train", "--gin_file=configs/smoke.gin", f"--run_dir={run_dir}",
             *faults.bindings(cache, **{"Trainer.mlflow": "True", "Trainer.max_steps": "3",
                                        "train.sample_prompt": "'def '", "train.sample_tokens": "8"})]
    proc = _run(tmp_path, "train", train, use_strace)
    assert "Sample from the trained model" in proc.stdout
    assert (run_dir / "mlflow.db").is_file()
    generate = ["-m", "codex_ml.cli.generate", f"--checkpoint={run_dir}", "--prompt=def ", "--max_new_tokens=8"]
    _run(tmp_path, "generate", generate, use_strace)
    _run(tmp_path, "export", ["-m", "codex_ml.cli.export", f"--checkpoint={run_dir}", f"--out={tmp_path / 'hf'}"],
         use_strace)
    _run(tmp_path, "generate_hf", ["-m", "codex_ml.cli.generate", f"--checkpoint={tmp_path / 'hf'}",
                                   "--prompt=def ", "--max_new_tokens=8"], use_strace)
    print(f"recorders: socket guard{', strace' if use_strace else ' (strace unavailable here)'}")
