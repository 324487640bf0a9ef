"""Batch samplers for ``DataLoader(batch_sampler=...)``: deterministic, resumable, world-size independent.

Both samplers yield, forever (epoch after epoch), this rank's list of keys for each *global* batch, starting
at ``start_position`` (a settable attribute counting global batches since the start of training; the trainer
checkpoints it). A global batch is ``per_device_batch * world_size`` samples; rank ``r`` takes the ``r``-th
slice of it. So the samples of global batch ``k`` depend on (seed, k) alone: not on the world size, the
number of loader workers, or whether the run was resumed. Incomplete tails are dropped so every rank sees
the same number of batches.

* :class:`ResumableBatchSampler` -- keys ``(epoch, index)``: one seeded permutation of all rows per epoch.
* :class:`BucketBatchSampler` -- keys ``(epoch, index, bucket)``: every global batch from one aspect-ratio
  bucket (so every rank's micro-batch has one shape); buckets interleaved in a seeded order per epoch.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import DataError


def epoch_permutation(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch]).permutation(n)


def _check_layout(per_device_batch: int, world_size: int, rank: int) -> None:
    if per_device_batch < 1:
        raise DataError(f"--train_batch_size must be >= 1 (got {per_device_batch})")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} of {world_size} processes")


class _GlobalBatches:
    """Shared iteration: a subclass plans an epoch once (:meth:`plan`) and says which keys global batch ``k``
    of a plan holds (:meth:`keys`). Plans are numpy arrays, not lists of keys: O(rows) integers per epoch."""

    batches_per_epoch: int
    start_position: int

    def __init__(self, per_device_batch: int, seed: int, world_size: int, rank: int, shuffle: bool,
                 start_position: int):
        _check_layout(per_device_batch, world_size, rank)
        self.per_device_batch = per_device_batch
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.global_batch = per_device_batch * world_size
        self.start_position = start_position
        self._memo = (None, None)  # (epoch, its plan): an epoch is planned once, not once per batch

    def plan(self, epoch: int):
        raise NotImplementedError

    def keys(self, epoch: int, plan, k: int, lo: int, hi: int) -> list:
        """Keys ``lo:hi`` of global batch ``k`` of ``epoch``."""
        raise NotImplementedError

    def _plan(self, epoch: int):
        if self._memo[0] != epoch:
            self._memo = (epoch, self.plan(epoch))
        return self._memo[1]

    def global_batch_at(self, position: int, lo: int = 0, hi: int | None = None) -> list:
        """Keys of the global batch at ``position`` (all ranks, or the slice ``lo:hi``)."""
        epoch, k = divmod(position, self.batches_per_epoch)
        return self.keys(epoch, self._plan(epoch), k, lo, self.global_batch if hi is None else hi)

    def __iter__(self):
        pos = self.start_position
        lo, hi = self.rank * self.per_device_batch, (self.rank + 1) * self.per_device_batch
        while True:
            yield self.global_batch_at(pos, lo, hi)
            pos += 1

    def __len__(self) -> int:  # batches per epoch (the iterator itself never ends)
        return self.batches_per_epoch


class ResumableBatchSampler(_GlobalBatches):
    """Keys ``(epoch, index)``; global batch ``k`` of an epoch is entries ``k*G .. k*G+G-1`` of the epoch's
    seeded permutation (``G`` = ``per_device_batch * world_size``); the last ``num_samples % G`` are dropped."""

    def __init__(self, num_samples: int, per_device_batch: int, seed: int, world_size: int = 1, rank: int = 0,
                 shuffle: bool = True, start_position: int = 0):
        super().__init__(per_device_batch, seed, world_size, rank, shuffle, start_position)
        self.num_samples = num_samples
        self.batches_per_epoch = num_samples // self.global_batch
        self.dropped_per_epoch = num_samples - self.batches_per_epoch * self.global_batch
        if self.batches_per_epoch == 0:
            raise DataError(f"--train_batch_size: a global batch of {self.global_batch} ({per_device_batch} x "
                            f"{world_size} processes) is larger than the data set ({num_samples} samples); "
                            f"lower the batch size or add data")

    def plan(self, epoch: int) -> np.ndarray:
        return epoch_permutation(self.num_samples, self.seed, epoch, self.shuffle)

    def keys(self, epoch, plan, k, lo, hi) -> list:
        start = k * self.global_batch
        return [(epoch, int(i)) for i in plan[start + lo:start + hi]]


class BucketBatchSampler(_GlobalBatches):
    """Keys ``(epoch, index, bucket)``; every global batch holds rows of one bucket.

    Per epoch, each bucket's rows are permuted (seeded by seed, epoch and bucket), cut into global batches
    (the incomplete tail of each bucket is dropped: ``dropped_per_epoch`` samples in all), and the batches of
    all buckets are shuffled together (seeded by seed and epoch). Rows with bucket -1 (unreadable image
    header) are never drawn (``excluded``).
    """

    def __init__(self, bucket_of_row: Sequence[int], per_device_batch: int, seed: int, world_size: int = 1,
                 rank: int = 0, shuffle: bool = True, start_position: int = 0):
        super().__init__(per_device_batch, seed, world_size, rank, shuffle, start_position)
        of_row = np.asarray(list(bucket_of_row), dtype=np.int64)
        self.num_samples = len(of_row)
        self.excluded = int((of_row < 0).sum())
        self.rows_by_bucket = {int(b): np.flatnonzero(of_row == b) for b in np.unique(of_row[of_row >= 0])}
        g = self.global_batch
        self.batches_per_epoch = sum(len(r) // g for r in self.rows_by_bucket.values())
        self.dropped_per_epoch = sum(len(r) % g for r in self.rows_by_bucket.values())
        if self.batches_per_epoch == 0:
            largest = max((len(r) for r in self.rows_by_bucket.values()), default=0)
            raise DataError(f"--train_batch_size: a global batch of {g} ({per_device_batch} x {world_size} "
                            f"processes) is larger than every aspect-ratio bucket (the largest holds {largest} "
                            f"images); lower the batch size, add data, or train without buckets")

    def plan(self, epoch: int):
        """(rows of every full batch, bucket by bucket, as one array; the seeded order of the batches)."""
        g = self.global_batch
        rows, buckets = [], []
        for b, members in self.rows_by_bucket.items():
            if self.shuffle:
                members = np.random.default_rng([self.seed, epoch, 1, b]).permutation(members)
            full = len(members) // g
            rows.append(members[:full * g])
            buckets += [b] * full
        order = np.arange(len(buckets))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch, 0]).permutation(len(buckets))
        return np.concatenate(rows), np.asarray(buckets), order

    def keys(self, epoch, plan, k, lo, hi) -> list:
        rows, buckets, order = plan
        j = int(order[k])
        b, start = int(buckets[j]), j * self.global_batch
        return [(epoch, int(i), b) for i in rows[start + lo:start + hi]]


__all__ = ["BucketBatchSampler", "ResumableBatchSampler", "epoch_permutation"]
