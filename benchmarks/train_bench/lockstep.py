"""The driver's side of a run: every training in its own process, all alive at once, one computing at a time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks.train_bench.spec import BenchSpec


def child_env(settings: str) -> dict[str, str]:
    """The environment of a training process. as_shipped: codex_ml's kernels choose their CPU matrix-product
    backend as shipped (by CPU vendor); same_settings: ATen's (MKL), which PyTorch's own layers use, for all."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p), MLFLOW_DISABLE_TELEMETRY="true",
               DO_NOT_TRACK="true", HF_HUB_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    env.pop("BUILD_WORKING_DIRECTORY", None)
    env.pop("CODEX_CPU_GEMM", None)
    if settings == "same_settings":
        env["CODEX_CPU_GEMM"] = "aten"
    return env


class Child:
    """One training's process (an implementation under one comparison's settings) and the two pipes of its gate
    (see StepClock)."""

    def __init__(self, impl: str, settings: str, spec: BenchSpec, work: Path, init_path: Path):
        self.impl, self.settings = impl, settings
        name = f"{impl}.{settings}"
        self.log_path, self.out_path = work / f"{name}.log", work / f"{name}.result.json"
        task_path = work / f"{name}.task.json"
        task_path.write_text(json.dumps({"spec": asdict(spec), "settings": settings, "init_path": str(init_path),
                                         "run_dir": str(work / f"run_{name}")}))
        go_read, self.go = os.pipe()
        self.done, done_write = os.pipe()
        command = [sys.executable, "-m", "benchmarks.train_bench.worker", impl, str(task_path), str(self.out_path),
                   f"{go_read},{done_write}"]
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(command, env=child_env(settings), cwd=work, stdout=log,
                                         stderr=subprocess.STDOUT, pass_fds=(go_read, done_write))
        os.close(go_read)
        os.close(done_write)

    def failure(self, what: str) -> RuntimeError:
        self.proc.wait()
        tail = self.log_path.read_text()[-4000:]
        return RuntimeError(f"{self.impl} ({self.settings}) {what} (exit {self.proc.returncode}); end of "
                            f"{self.log_path}:\n{tail}")

    def wait_step(self) -> None:
        """Blocks until the child has finished its next optimizer step."""
        if os.read(self.done, 1) != b".":
            raise self.failure("stopped before its last step")

    def allow_step(self) -> None:
        try:
            os.write(self.go, b".")
        except BrokenPipeError:
            raise self.failure("stopped before its last step") from None

    def finish(self) -> dict[str, Any]:
        self.allow_step()  # past the last step: the child finishes and writes its results
        self.proc.wait()
        os.close(self.go)
        os.close(self.done)
        if self.proc.returncode != 0 or not self.out_path.is_file():
            raise self.failure("failed")
        return json.loads(self.out_path.read_text())


def run_lockstep(runs: list[tuple[str, str]], spec: BenchSpec, work: Path, init_path: Path) -> list[dict[str, Any]]:
    """Runs every (implementation, settings) pair in its own process, all alive at once but only one computing at
    a time: after the first step (with the setup, concurrent and untimed) the driver lets each process run one
    optimizer step in turn, rotating the order every step, so other load on a shared machine falls on all of them
    alike. Returns each process's measurements, in the order of `runs`."""
    children = [Child(impl, settings, spec, work, init_path) for impl, settings in runs]
    try:
        for child in children:
            child.wait_step()
        for step in range(2, spec.steps + 1):
            shift = step % len(children)
            for child in children[shift:] + children[:shift]:
                child.allow_step()
                child.wait_step()
            if step % 10 == 0 or step == spec.steps:
                print(f"  step {step}/{spec.steps}", flush=True)
        return [child.finish() for child in children]
    finally:
        for child in children:
            if child.proc.poll() is None:
                child.proc.kill()
                child.proc.wait()
