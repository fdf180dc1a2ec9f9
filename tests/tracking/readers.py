"""Readers of what the tracking backends wrote, with each backend's own code: TensorBoard's EventAccumulator, and
wandb's record protobuf over the .wandb transaction log; and a guard that refuses sockets to other machines."""

from __future__ import annotations

import json
import socket
import struct
import zlib
from pathlib import Path

LOOPBACK = ("127.0.0.1", "::1", "localhost")


class NetworkGuard:
    """Replaces socket.connect (and create_connection's use of it) for the test process: any connection to an
    address other than loopback or a Unix socket is refused and recorded."""

    def __init__(self):
        self.attempts: list = []
        self._real = socket.socket.connect
        self._real_ex = socket.socket.connect_ex

    def _allowed(self, sock: socket.socket, address) -> bool:
        return sock.family not in (socket.AF_INET, socket.AF_INET6) or str(address[0]) in LOOPBACK

    def __enter__(self) -> NetworkGuard:
        guard = self

        def connect(sock, address):
            if not guard._allowed(sock, address):
                guard.attempts.append(address)
                raise OSError(f"the test refuses a connection to {address}")
            return guard._real(sock, address)

        def connect_ex(sock, address):
            if not guard._allowed(sock, address):
                guard.attempts.append(address)
                return 111
            return guard._real_ex(sock, address)

        socket.socket.connect, socket.socket.connect_ex = connect, connect_ex
        return self

    def __exit__(self, *exc) -> None:
        socket.socket.connect, socket.socket.connect_ex = self._real, self._real_ex


def ndjson(run_dir: Path, split: str) -> dict[int, dict]:
    """step -> the metrics.ndjson record of `split` at that step."""
    lines = (run_dir / "metrics.ndjson").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if r["split"] == split}


def tensorboard_scalars(log_dir: Path):
    """TensorBoard's own reader over the event files of `log_dir`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


_BLOCK, _HEADER = 32768, 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def wandb_records(path: Path):
    """The records of a .wandb file as wandb's protobuf Record messages. The file is wandb's transaction log
    (LevelDB's log format: 32 KiB blocks of CRC-32-checked chunks after a 7-byte ':W&B' header); each chunk's
    checksum is verified."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:_HEADER])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), (ident, magic, version)
    position, pending = _HEADER, b""
    while position + _HEADER <= len(data):
        left = _BLOCK - position % _BLOCK
        if left < _HEADER:  # a block's tail too short for a chunk header is padding
            position += left
            continue
        checksum, length, kind = struct.unpack("<IHB", data[position:position + _HEADER])
        if kind == 0:
            break
        chunk = data[position + _HEADER:position + _HEADER + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == checksum, f"bad chunk at {position}"
        position += _HEADER + length
        if kind == _FULL:
            raw = chunk
        elif kind == _FIRST:
            pending = chunk
            continue
        elif kind == _MIDDLE:
            pending += chunk
            continue
        else:
            raw = pending + chunk
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        yield record


def wandb_history(run_dir: Path) -> dict[int, dict[str, float]]:
    """step -> the metrics W&B logged at that step, from the offline run in <run_dir>/wandb/."""
    (path,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    history = {}
    for record in wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history[int(items["_step"])] = {k: v for k, v in items.items() if not k.startswith("_")}
    return history
