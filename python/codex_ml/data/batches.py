"""Deterministic, resumable batches of packed token sequences.

A split's tokens (documents joined with eos) are cut into sequences of seq_len + 1 tokens. Each epoch
visits them in a permutation drawn from (seed, epoch); rank r of w takes every w-th sequence of it,
so ranks see disjoint data. The iterator's state (epoch, position) restores it exactly; it also records the
split's sequence count and, when given, the digest of its shards, so that a position is never applied to another
shard set, and a position outside the epoch is an error rather than a silent roll into the next epoch.

Packed documents attend across their eos unless the model masks it: with `document_ids=True` each batch
also carries "segment_ids" [B, T] (which document of the row each position belongs to; the eos belongs
to the document it ends), and `document_attention_mask` turns them into a causal block-diagonal mask.
"""

from __future__ import annotations

import numpy as np
import torch

from codex_ml.data.corpus import DataError


def document_attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Bool [B, T, T]: query t may attend to key s iff s <= t and both are in the same document."""
    T = segment_ids.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    return causal & (segment_ids.unsqueeze(-1) == segment_ids.unsqueeze(-2))


class BatchIterator:
    """Yields {"input_ids": int64 [B, T], "targets": int64 [B, T]} (targets are the next tokens),
    plus "segment_ids" int64 [B, T] when `document_ids` (needs `eos_id`)."""

    def __init__(self, tokens: np.ndarray, *, split: str, batch_size: int, seq_len: int, seed: int,
                 rank: int = 0, world_size: int = 1, epoch_limit: int | None = None,
                 document_ids: bool = False, eos_id: int | None = None, shards_sha256: str | None = None):
        if batch_size < 1 or seq_len < 1:
            raise DataError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
        if document_ids and eos_id is None:
            raise DataError("document_ids=True needs the eos_id that separates the packed documents")
        self.document_ids, self.eos_id = document_ids, eos_id
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is not in [0, world_size={world_size})")
        self.tokens, self.split = tokens, split
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size, self.epoch_limit = rank, world_size, epoch_limit
        self.shards_sha256 = shards_sha256
        self.num_sequences = (len(tokens) - 1) // seq_len if len(tokens) > 1 else 0
        self.batches_per_epoch = self.num_sequences // world_size // batch_size
        if self.batches_per_epoch == 0:
            raise DataError(
                f"split {split!r} has {len(tokens)} tokens: too few for one batch of {batch_size} x {seq_len} "
                f"per rank on {world_size} rank(s); add documents, or lower batch_size or seq_len"
            )
        self.tokens_per_batch = batch_size * seq_len
        self.epoch, self.position = 0, 0
        self._order = None

    def _epoch_order(self) -> np.ndarray:
        if self._order is None or self._order[0] != self.epoch:
            perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_sequences)
            self._order = (self.epoch, perm[self.rank::self.world_size])
        return self._order[1]

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        if self.epoch_limit is not None and self.epoch >= self.epoch_limit:
            raise StopIteration
        order = self._epoch_order()
        starts = order[self.position * self.batch_size:(self.position + 1) * self.batch_size] * self.seq_len
        rows = np.stack([np.asarray(self.tokens[s:s + self.seq_len + 1], dtype=np.int64) for s in starts])
        self.position += 1
        rows = torch.from_numpy(rows)
        batch = {"input_ids": rows[:, :-1], "targets": rows[:, 1:]}
        if self.document_ids:
            is_eos = (batch["input_ids"] == self.eos_id).long()
            batch["segment_ids"] = is_eos.cumsum(dim=1) - is_eos  # an eos closes its own document
        return batch

    def state_dict(self) -> dict:
        """JSON-serialisable position of the iterator, with what it indexes (sequence count, shard digest)."""
        state = {"split": self.split, "epoch": self.epoch, "position": self.position, "seed": self.seed,
                 "rank": self.rank, "world_size": self.world_size, "batch_size": self.batch_size,
                 "seq_len": self.seq_len, "num_sequences": self.num_sequences}
        if self.shards_sha256 is not None:
            state["shards_sha256"] = self.shards_sha256
        return state

    def load_state_dict(self, state: dict) -> None:
        """Continues exactly where `state` was taken; the layout (batch, seq_len, ranks) and the data it indexes
        (sequence count, shard digest, where recorded on both sides) must match, and the position be in range."""
        for key in ("split", "seed", "rank", "world_size", "batch_size", "seq_len", "num_sequences"):
            if key in state and state[key] != getattr(self, key):
                raise DataError(f"cannot restore the data iterator: saved {key}={state[key]!r}, "
                                f"this run has {getattr(self, key)!r}")
        saved_digest = state.get("shards_sha256")
        if saved_digest is not None and self.shards_sha256 is not None and saved_digest != self.shards_sha256:
            raise DataError(f"cannot restore the data iterator: it was saved over another shard set of split "
                            f"{self.split!r} (SHA-256 {saved_digest[:12]}..., this run reads "
                            f"{self.shards_sha256[:12]}...); use the data of that run")
        epoch, position = int(state["epoch"]), int(state["position"])
        # position == batches_per_epoch: the epoch's last batch was taken; the next call starts the next epoch.
        if epoch < 0 or not 0 <= position <= self.batches_per_epoch:
            raise DataError(f"cannot restore the data iterator: saved position {position} of epoch {epoch} is "
                            f"outside split {self.split!r}, which has {self.batches_per_epoch} batches per epoch "
                            "here; the state belongs to other data or was edited")
        self.epoch, self.position = epoch, position
