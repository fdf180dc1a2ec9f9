"""A full disk while a checkpoint, the data cache or the metrics are written, and a read-only data cache.

The faults come from libfault_shim.so (LD_PRELOAD; see fault_shim.c): writes under one directory fail with ENOSPC
once a number of bytes went through, or every write there fails with EROFS. The shim works wherever the tests run
(no mount, no privileges) and reaches every writer in the process (Python, SentencePiece, safetensors, libtorch).
Each case ends with a clear message and the documented exit status, and no checkpoint or cache entry committed
before is lost or changed.
"""

import shutil

import faults
import pytest

from codex_ml.checkpoint import latest_valid_checkpoint, list_checkpoints, verify_checkpoint


@pytest.fixture(scope="module")
def earlier(tmp_path_factory):
    """A finished run (checkpoints at 3, 6, 9, 12) and its data cache."""
    tmp = tmp_path_factory.mktemp("earlier")
    rc, out, err = faults.train(tmp, tmp / "run", tmp / "cache")
    assert rc == 0, out[-2000:] + err[-4000:]
    return tmp / "run", tmp / "cache"


def _copy(earlier, tmp_path):
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    shutil.copytree(earlier[0], run_dir)
    shutil.copytree(earlier[1], cache)
    return run_dir, cache


def test_a_full_disk_during_a_checkpoint_save_keeps_the_earlier_ones(tmp_path, earlier):
    run_dir, cache = _copy(earlier, tmp_path)
    before = faults.committed(run_dir, cache)
    full = {"FAULT_ENOSPC_DIR": str(run_dir / "checkpoints"), "FAULT_ENOSPC_AFTER": "20000"}
    rc, out, err = faults.train(tmp_path, run_dir, cache, faults=full, **{"Trainer.max_steps": "15"})
    assert rc == 2, out[-2000:] + err[-4000:]
    message = faults.one_paragraph_error(err)
    assert f"Could not write checkpoint {run_dir / 'checkpoints' / 'step_00000015'}" in message, message
    assert "No space left on device" in message and "Earlier checkpoints are intact" in message, message
    faults.assert_kept(before, run_dir, cache)
    assert faults.temporaries(run_dir / "checkpoints") == []
    assert [step for step, _ in list_checkpoints(run_dir)] == [3, 6, 9, 12]

    rc, out, err = faults.train(tmp_path, run_dir, cache, **{"Trainer.max_steps": "15"})  # space freed: resume
    assert rc == 0, out[-2000:] + err[-4000:]
    assert verify_checkpoint(latest_valid_checkpoint(run_dir))["step"] == 15


def test_a_full_disk_while_building_the_data_cache_keeps_its_entries(tmp_path, earlier):
    run_dir, cache = _copy(earlier, tmp_path)
    before = faults.committed(run_dir, cache)
    # Another shard size: the same tokenizer, a new shard set to write, on a disk with room for 100 kB.
    full = {"FAULT_ENOSPC_DIR": str(cache), "FAULT_ENOSPC_AFTER": "100000"}
    rc, out, err = faults.train(tmp_path, tmp_path / "other", cache, faults=full,
                                **{"prepare_data.shard_tokens": "50000"})
    assert rc == 2, out[-2000:] + err[-4000:]
    message = faults.one_paragraph_error(err)
    assert f"cannot write the data cache: the disk holding {cache} is full" in message, message
    assert "nothing partial was left behind" in message
    faults.assert_kept(before, run_dir, cache)
    assert faults.temporaries(cache) == []
    assert faults.entries(cache / "shards") == faults.entries(earlier[1] / "shards")  # no new entry


def test_a_read_only_data_cache_is_refused_when_an_entry_is_missing_and_used_when_complete(tmp_path, earlier):
    run_dir, cache = _copy(earlier, tmp_path)
    before = faults.committed(run_dir, cache)
    read_only = {"FAULT_EROFS_DIR": str(cache)}
    rc, out, err = faults.train(tmp_path, tmp_path / "other", cache, faults=read_only,
                                **{"prepare_data.shard_tokens": "50000"})
    assert rc == 2, out[-2000:] + err[-4000:]
    message = faults.one_paragraph_error(err)
    assert f"cannot write the data cache: {cache} is not writable (Read-only file system)" in message, message
    faults.assert_kept(before, run_dir, cache)
    assert faults.temporaries(cache) == []

    # Everything this run needs is cached: a read-only cache serves it.
    rc, out, err = faults.train(tmp_path, tmp_path / "cached", cache, faults=read_only,
                                **{"Trainer.max_steps": "3"})
    assert rc == 0, out[-2000:] + err[-4000:]
    assert "Tokenizer: reusing cached" in out and "Shards: reusing cached" in out
    faults.assert_kept(before, run_dir, cache)


def test_a_full_disk_while_writing_metrics_is_reported_and_loses_no_checkpoint(tmp_path, earlier):
    run_dir, cache = _copy(earlier, tmp_path)
    before = faults.committed(run_dir, cache)
    metrics = (run_dir / "metrics.ndjson").read_bytes()
    full = {"FAULT_ENOSPC_DIR": str(run_dir / "metrics.ndjson"), "FAULT_ENOSPC_AFTER": "200"}
    rc, out, err = faults.train(tmp_path, run_dir, cache, faults=full, **{"Trainer.max_steps": "15"})
    assert rc == 0, out[-2000:] + err[-4000:]
    assert "Traceback" not in err, err[-4000:]
    assert "metrics.ndjson" in out + err and "No space left on device" in out + err, (out + err)[-4000:]
    faults.assert_kept(before, run_dir, cache)
    assert (run_dir / "metrics.ndjson").read_bytes().startswith(metrics)
    assert verify_checkpoint(latest_valid_checkpoint(run_dir))["step"] == 15  # training went on to the end
