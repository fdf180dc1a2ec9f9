"""Two processes at once: two runs on one run directory, and two runs building the same data cache entries."""

import signal

import faults

from codex_ml.checkpoint import list_checkpoints, verify_checkpoint
from codex_ml.data import load_prepared
from codex_ml.tokenization import Tokenizer


def test_two_runs_building_the_same_cache_both_succeed_and_build_it_once(tmp_path):
    cache = tmp_path / "cache"
    procs = [faults.start(tmp_path, tmp_path / name, cache, **{"Trainer.max_steps": "2"}) for name in ("a", "b")]
    results = [faults.finish(proc) for proc in procs]
    for rc, out, err in results:
        assert rc == 0, out[-2000:] + err[-4000:]
    logs = "".join(out for _, out, _ in results)
    assert logs.count("Tokenizer: trained") == 1 and logs.count("Shards: tokenized") == 1, logs[-4000:]
    tokenizers, shards = faults.entries(cache / "tokenizers"), faults.entries(cache / "shards")
    assert len(tokenizers) == 1 and len(shards) == 1, (tokenizers, shards)
    tokenizer = Tokenizer.load(cache / "tokenizers" / tokenizers[0] / "tokenizer.model")
    load_prepared(cache / "shards" / shards[0], tokenizer)  # every shard verifies, made with that tokenizer
    assert faults.temporaries(cache) == []


def test_a_second_run_on_the_same_run_directory_is_refused_naming_the_first(tmp_path):
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    # A long first run, its saves slowed, so that it is alive while the second one starts and ends.
    slow = {"FAULT_SLOW_FSYNC_DIR": str(run_dir / "checkpoints"), "FAULT_SLOW_FSYNC_MS": "100"}
    first = faults.start(tmp_path, run_dir, cache, faults=slow, **{"Trainer.max_steps": "1000"})
    assert faults.wait_for(lambda: (run_dir / "checkpoints" / "step_00000003").is_dir(), first)
    before = faults.committed(run_dir, cache)
    metrics = (run_dir / "metrics.ndjson").read_bytes()
    rc, out, err = faults.train(tmp_path, run_dir, cache, **{"Trainer.max_steps": "1000"})
    assert first.poll() is None, "the first run ended before the second one"
    assert rc == 2, out[-2000:] + err[-4000:]
    message = faults.one_paragraph_error(err)
    assert f"{run_dir} is in use by another run (pid {first.pid} host " in message, message
    faults.assert_kept(before, run_dir, cache)
    assert (run_dir / "metrics.ndjson").read_bytes().startswith(metrics)

    first.send_signal(signal.SIGTERM)  # the first run goes on undisturbed, to a checkpoint
    rc, out, err = faults.finish(first)
    assert rc == 0, out[-2000:] + err[-4000:]
    faults.assert_kept(before, run_dir, cache)
    steps = faults.train_steps(run_dir)
    assert steps == list(range(1, len(steps) + 1))  # the first run's steps, each once
    assert [step for step, _ in list_checkpoints(run_dir)][-1] == steps[-1]
    for _, path in list_checkpoints(run_dir):
        verify_checkpoint(path)
