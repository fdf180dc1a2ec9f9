"""kill -9 at random moments of a run, resumed with --resume=auto each time.

The moments: during data preparation (the tokenizer or the token shards being built), inside checkpoint saves
(found by polling the run directory for a checkpoint temporary; fsyncs there are slowed by the fault shim so a save
is caught midway), and at a random time after a random step. After every kill, no checkpoint or cache entry
committed before is lost or changed, and whatever the kill left behind is never trusted; at the end the weights are
bitwise those of an uninterrupted run of the same configuration and seed. FAULT_SEED picks the moments (it is in
the failure message).
"""

import os
import random
import signal
import time

import faults
import torch

from codex_ml.checkpoint import latest_valid_checkpoint, list_checkpoints, load_model_state, verify_checkpoint

SEED = int(os.environ.get("FAULT_SEED", random.SystemRandom().randrange(1 << 30)))


def _saving(run_dir):
    return lambda: any(p.name.startswith(".tmp-step_") for p in faults.temporaries(run_dir / "checkpoints"))


def _after_step(run_dir, step):
    return lambda: max(faults.train_steps(run_dir), default=0) >= step


def test_kill_9_at_random_moments_then_resume_matches_an_uninterrupted_run(tmp_path):
    rng = random.Random(SEED)
    where = f"FAULT_SEED={SEED}"
    rc, out, err = faults.train(tmp_path, tmp_path / "straight", tmp_path / "cache-straight", "--resume=never")
    assert rc == 0, (where, out[-2000:], err[-4000:])
    straight = load_model_state(latest_valid_checkpoint(tmp_path / "straight"))

    run_dir, cache = tmp_path / "killed", tmp_path / "cache"
    slow = {"FAULT_SLOW_FSYNC_DIR": str(run_dir / "checkpoints"), "FAULT_SLOW_FSYNC_MS": "40"}
    moments = [
        ("data preparation", lambda: (cache / "tokenizers").exists(), rng.uniform(0.0, 2.0)),
        ("a checkpoint save", _saving(run_dir), rng.uniform(0.0, 0.1)),
        ("a step", _after_step(run_dir, rng.randint(4, 7)), rng.uniform(0.0, 0.5)),
        ("a checkpoint save", _saving(run_dir), rng.uniform(0.0, 0.1)),
        ("a step", _after_step(run_dir, rng.randint(8, faults.STEPS - 1)), rng.uniform(0.0, 0.5)),
    ]
    kills = []
    for name, condition, delay in moments:
        before = faults.committed(run_dir, cache)
        proc = faults.start(tmp_path, run_dir, cache, faults=slow)
        if faults.wait_for(condition, proc):
            time.sleep(delay)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills.append(name)
        rc, out, err = faults.finish(proc)
        assert rc in (0, -signal.SIGKILL), (where, name, out[-2000:], err[-4000:])
        faults.assert_kept(before, run_dir, cache)
        for _, path in list_checkpoints(run_dir):  # what a kill leaves is a temporary, never a damaged checkpoint
            verify_checkpoint(path)
    assert len(kills) >= 3, (where, kills)

    rc, out, err = faults.train(tmp_path, run_dir, cache)
    assert rc == 0, (where, kills, out[-2000:], err[-4000:])
    assert "Traceback" not in err
    final = latest_valid_checkpoint(run_dir)
    assert final.name == f"step_{faults.STEPS:08d}", (where, kills, final)
    weights = load_model_state(final)
    assert weights.keys() == straight.keys()
    for key, tensor in straight.items():
        assert torch.equal(weights[key], tensor), (where, kills, key)
    assert faults.temporaries(run_dir / "checkpoints") == [] and faults.temporaries(cache) == [], where
    assert faults.train_steps(run_dir) == list(range(1, faults.STEPS + 1)), (where, kills)  # each step once
