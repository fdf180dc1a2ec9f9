"""The data cache under faults: concurrent builds, a full or read-only disk, interruptions, a crash between the
tokenizer's model and its digest. Nothing half-written is ever trusted, and no temporary stays behind."""

import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from codex_ml._files import LockFile
from codex_ml.data import prepare_data
from codex_ml.data import shards as shards_module
from codex_ml.tokenization import Tokenizer

sys.path.insert(0, str(Path(__file__).parent))
from data_test import make_corpus  # noqa: E402


def prepare(cache, corpus, **kwargs):
    logs = []
    data = prepare_data(cache, sources=[str(corpus)], vocab_size=300, splits=(0.8, 0.1, 0.1), log=logs.append,
                        **kwargs)
    return data, logs


def temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(".tmp-")]


def cache_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
            and not p.name.endswith(".lock")}


# Each child slows down its tokenizer training and shard writing, so that two started together overlap in both.
CHILD = textwrap.dedent("""
    import sys, time
    from codex_ml.data import pipeline, shards
    from codex_ml.tokenization import Tokenizer
    train, write = Tokenizer.train.__func__, shards.write_shards
    Tokenizer.train = classmethod(lambda cls, *a, **k: (time.sleep(1.0), train(cls, *a, **k))[1])
    pipeline.write_shards = lambda *a, **k: (time.sleep(1.0), write(*a, **k))[1]
    data = pipeline.prepare_data(sys.argv[1], sources=[sys.argv[2]], vocab_size=300, splits=(0.8, 0.1, 0.1))
    print("DIRECTORY", data.directory)
""")


def test_two_concurrent_builds_of_one_shard_set_both_succeed(tmp_path):
    src = make_corpus(tmp_path / "src")
    cache = tmp_path / "cache"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(cache), str(src)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(2)]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    both = "\n".join(outputs)
    assert both.count("Tokenizer: trained") == 1 and both.count("Shards: tokenized") == 1, both
    waited = [line for line in both.splitlines() if line.startswith("Waiting for")]
    pids = {str(p.pid) for p in procs}
    assert waited and all(any(f"pid {pid} " in line for pid in pids) for line in waited), waited
    assert len({line for line in both.splitlines() if line.startswith("DIRECTORY")}) == 1
    assert temporaries(cache) == []


def test_a_waiting_run_says_once_whom_it_waits_for(tmp_path):
    src = make_corpus(tmp_path / "src")
    cache = tmp_path / "cache"
    data, _ = prepare(cache, src)
    directory = data.directory
    saved = cache_files(directory)
    for path in directory.iterdir():
        path.unlink()
    directory.rmdir()
    lock = LockFile(directory.with_name(directory.name + ".lock"))
    lock.acquire()  # as another run building the same shard set would
    logs, result = [], {}
    worker = threading.Thread(target=lambda: result.update(
        data=prepare_data(cache, sources=[str(src)], vocab_size=300, splits=(0.8, 0.1, 0.1), log=logs.append)))
    worker.start()
    deadline = time.time() + 60
    while not any(line.startswith("Waiting") for line in logs) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    assert worker.is_alive() and not (directory / "manifest.json").exists()  # it waits, it does not build
    lock.release()
    worker.join(60)
    waits = [line for line in logs if line.startswith("Waiting")]
    assert len(waits) == 1 and f"pid {os.getpid()} host " in waits[0] and str(directory) in waits[0]
    assert result["data"].directory == directory and cache_files(directory) == saved


def test_a_holder_killed_with_sigkill_releases_the_cache_lock(tmp_path):
    src = make_corpus(tmp_path / "src")
    cache = tmp_path / "cache"
    data, _ = prepare(cache, src)
    lock_path = data.directory.with_name(data.directory.name + ".lock")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom codex_ml._files import LockFile\n"
                               "LockFile(sys.argv[1]).acquire()\nprint('held', flush=True)\ntime.sleep(600)",
                               str(lock_path)], env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait()
    with LockFile(lock_path) as lock:  # does not raise: the kernel released the dead holder's lock
        assert lock.held


# Runs in a private mount namespace (unshare) on a small tmpfs mounted as the cache: a real full disk, a real
# read-only filesystem (the tests run as root, whom file modes do not stop). It prints what happened as JSON.
ON_TMPFS = """
import json, subprocess, sys
from pathlib import Path
from codex_ml.data import DataError, prepare_data
cache, src, mode = Path(sys.argv[1]), sys.argv[2], sys.argv[3]

def run(**kwargs):
    try:
        prepare_data(cache, sources=[src], splits=(0.8, 0.1, 0.1), log=lambda line: None, **kwargs)
        return "ok"
    except DataError as err:
        return str(err)

def temporaries():
    return [str(p) for p in cache.rglob("*") if p.name.startswith(".tmp-")]

report = {"first": run(vocab_size=300), "temporaries": temporaries()}
if mode == "read-only":
    subprocess.run(["mount", "-o", "remount,ro", str(cache)], check=True)
    report["reuse"] = run(vocab_size=300)  # a complete cache is read without writing
    report["build"] = run(vocab_size=320)
else:
    subprocess.run(["mount", "-o", "remount,size=4m", str(cache)], check=True)  # space again
    report["again"] = run(vocab_size=300)
report["temporaries_after"] = temporaries()
print(json.dumps(report))
"""


def on_tmpfs(tmp_path: Path, size: str, mode: str) -> dict:
    src = make_corpus(tmp_path / "src")
    cache = tmp_path / "cache"
    cache.mkdir()
    script = tmp_path / "on_tmpfs.py"
    script.write_text(ON_TMPFS)
    command = (f"mount -t tmpfs -o size={size} tmpfs {shlex.quote(str(cache))} && exec {shlex.quote(sys.executable)} "
               f"{shlex.quote(str(script))} {shlex.quote(str(cache))} {shlex.quote(str(src))} {mode}")
    out = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", command], text=True,
                         capture_output=True, timeout=300, env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("size", ["8k", "64k"])  # full while writing the tokenizer; while writing the shards
def test_a_full_disk_is_a_clear_error_and_leaves_no_temporary(tmp_path, size):
    report = on_tmpfs(tmp_path, size, "full")
    cache = tmp_path / "cache"
    assert re.match(rf"cannot write the data cache: the disk holding {cache} is full \(.*\): free space there or "
                    r"choose another directory \(train.cache_dir\); nothing partial was left behind", report["first"])
    assert report["temporaries"] == []
    assert report["again"] == "ok" and report["temporaries_after"] == []  # with space again, the build completes


def test_a_read_only_cache_is_a_clear_error_and_a_complete_one_is_still_read(tmp_path):
    report = on_tmpfs(tmp_path, "4m", "read-only")
    cache = tmp_path / "cache"
    assert report["first"] == "ok" and report["reuse"] == "ok"
    assert re.match(rf"cannot write the data cache: {cache} is not writable \(.*\): make it writable or choose "
                    "another directory on a writable disk", report["build"])
    assert report["temporaries_after"] == []


def test_a_tokenizer_without_its_recorded_digest_is_retrained(tmp_path):
    # A crash between writing the model and its digest: the model there may be anything, so it is not trusted.
    src = make_corpus(tmp_path / "src")
    cache = tmp_path / "cache"
    data, _ = prepare(cache, src)
    original = data.tokenizer.sha256
    (entry,) = [p for p in (cache / "tokenizers").iterdir() if p.is_dir()]
    (entry / "tokenizer.sha256").unlink()
    other = Tokenizer.train(["completely different text\n" * 50, "x = 1\n"], tmp_path / "other.model",
                            vocab_size=280)
    (entry / "tokenizer.model").write_bytes(other.model_path.read_bytes())
    again, logs = prepare(cache, src)
    assert again.tokenizer.sha256 == original and any("Tokenizer: trained" in line for line in logs)
    assert (entry / "tokenizer.sha256").read_text().strip() == original


def test_an_interrupted_build_leaves_nothing_and_its_leftovers_are_removed(tmp_path, monkeypatch):
    src = make_corpus(tmp_path / "src")
    cache = tmp_path / "cache"
    data, _ = prepare(cache, src)
    directory = data.directory
    for path in directory.iterdir():
        path.unlink()
    directory.rmdir()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(shards_module, "file_sha256", interrupted)  # Ctrl-C after the first shard is written
    with pytest.raises(KeyboardInterrupt):
        prepare(cache, src)
    assert temporaries(cache) == [] and not directory.exists()
    monkeypatch.undo()
    # What a kill -9 leaves: a temporary of a writer that is gone, removed by the next build under the lock.
    stale = directory.with_name(f".tmp-{directory.name}-999999-0a0b0c0d")
    stale.mkdir()
    (stale / "train_00000.bin").write_bytes(b"\0" * 64)
    _, logs = prepare(cache, src)
    assert not stale.exists() and any(f"Removed {stale}" in line for line in logs)
    assert (directory / "manifest.json").is_file()
