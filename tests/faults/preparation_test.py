"""SIGTERM and SIGINT (Ctrl-C) during data preparation, while a new tokenizer is trained beside committed cache
entries: nothing committed is lost or changed and the next run trains; Ctrl-C says so in one line and exits 130,
leaving no cache temporary and no run directory behind.
"""

import random
import shutil
import signal
import time
from types import SimpleNamespace

import faults
import pytest

from codex_ml.checkpoint import latest_valid_checkpoint, list_checkpoints


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return faults.prepared_cache(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def interrupted_preparation(request, tmp_path_factory, cache):
    """A run stopped by a signal (request.param) while it builds its data cache, beside an earlier run's entries."""
    tmp = tmp_path_factory.mktemp(f"preparation-{request.param}")
    shared = tmp / "cache"
    shutil.copytree(cache, shared)
    before = faults.committed(shared)
    # Another vocabulary: a new tokenizer and shard set to build, next to the committed ones.
    options = {"prepare_data.vocab_size": "384"}
    # Slow fsyncs in the cache (1.5 s each) keep the run in data preparation when the signal comes, however fast
    # the machine builds a tokenizer this small.
    slow = {"FAULT_SLOW_FSYNC_DIR": str(shared), "FAULT_SLOW_FSYNC_MS": "1500"}
    proc = faults.start(tmp, tmp / "run", shared, faults=slow, **options)
    committed_entries = len(list((cache / "tokenizers").iterdir()))
    assert faults.wait_for(lambda: len(list((shared / "tokenizers").iterdir())) > committed_entries, proc)
    time.sleep(random.uniform(0.0, 1.0))
    proc.send_signal(getattr(signal, request.param))
    rc, out, err = faults.finish(proc)
    return SimpleNamespace(tmp=tmp, cache=shared, before=before, options=options, rc=rc, out=out, err=err,
                           temporaries=faults.temporaries(shared), run_dir_left=(tmp / "run").exists())


@pytest.mark.parametrize("interrupted_preparation", ["SIGINT", "SIGTERM"], indirect=True)
def test_interrupted_data_preparation_loses_nothing_and_the_next_run_trains(interrupted_preparation):
    stopped = interrupted_preparation
    assert stopped.rc != 0, stopped.out[-2000:] + stopped.err[-4000:]
    faults.assert_kept(stopped.before, stopped.cache)
    assert not list_checkpoints(stopped.tmp / "run")
    rc, out, err = faults.train(stopped.tmp, stopped.tmp / "run", stopped.cache, **stopped.options,
                                **{"Trainer.max_steps": "3"})
    assert rc == 0, out[-2000:] + err[-4000:]
    assert latest_valid_checkpoint(stopped.tmp / "run").name == "step_00000003"
    faults.assert_kept(stopped.before, stopped.cache)
    assert faults.temporaries(stopped.cache) == []


@pytest.mark.parametrize("interrupted_preparation", [
    "SIGINT",
    "SIGTERM",
], indirect=True)
def test_interrupted_data_preparation_says_so_in_one_line_and_leaves_nothing_behind(interrupted_preparation):
    stopped = interrupted_preparation
    status = stopped.out[-2000:] + stopped.err[-4000:]
    assert stopped.rc == (130 if "SIGINT" in stopped.tmp.name else 143), status  # an exit, not a kill
    assert "Traceback" not in stopped.err, stopped.err[-4000:]
    assert [line for line in stopped.err.splitlines() if line.startswith("Interrupted")], stopped.err[-4000:]
    assert stopped.temporaries == []
    assert not stopped.run_dir_left  # the run directory made for this run, removed
