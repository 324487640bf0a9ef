"""Streaming training from parquet shards (``--streaming``): rows are read where they lie, as needed.

``load_dataset`` converts a data set into a local Arrow copy before the first step; for a data set that should
not be copied (tens of millions of rows on shared storage) :class:`ParquetRows` reads the parquet files in place:
their footers (row counts per row group) up front, a row group's data only when a batch needs one of its rows,
and only the columns training uses. It looks like the ``datasets.Dataset`` the rest of the data layer reads
(``len``, ``rows[i]`` -> dict, ``column_names``, ``_fingerprint``), so crops, flips, captions, bad images and
the latent cache work on it unchanged.

Order and exact resume: :class:`StreamingBatchSampler` keeps the contract of :mod:`.sampling` (keys per global
batch, a function of (seed, position) alone), with locality: the row groups are cut once into fixed *windows*
of consecutive groups holding at least ``--shuffle_buffer_size`` rows; each epoch visits the windows in a seeded
order and shuffles rows only inside a window (as a shuffle buffer does), so a process holds the row groups of
one window at a time. Incomplete global batches at the end of each window (of each bucket in it) are dropped.

Aspect-ratio buckets come from image sizes stored with the data -- integer ``width`` and ``height`` columns,
as img2dataset writes them -- read alone (a few bytes per row); never by opening every image before step 1.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
from collections import OrderedDict

import numpy as np

from ..errors import DataError, UsageError
from .sampling import _GlobalBatches

SIZE_COLUMNS = ("width", "height")


def parquet_files(source: str, flag: str = "--dataset_name") -> list:
    """The parquet files of ``source``: one file, a glob, or every ``*.parquet`` under a folder (sorted)."""
    if os.path.isdir(source):
        files = sorted(glob.glob(os.path.join(source, "**", "*.parquet"), recursive=True))
    elif any(ch in source for ch in "*?["):
        files = sorted(glob.glob(source, recursive=True))
    else:
        files = [source] if os.path.isfile(source) else []
    if not files:
        raise DataError(f"{flag} {source}: --streaming reads parquet shards, and there is no .parquet file there "
                        f"(give a folder of .parquet files, one file, or a glob such as 'data/*.parquet')")
    return files


class ParquetRows:
    """Random access by row number to parquet files read in place (see module doc)."""

    def __init__(self, files: list, columns: list | None = None, max_rows: int | None = None,
                 cached_groups: int = 4):
        import pyarrow.parquet as pq

        self.files = list(files)
        self.groups = []  # (file index, row group, rows)
        schema = None
        for f_id, path in enumerate(self.files):
            try:
                meta = pq.ParquetFile(path).metadata
            except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a damaged or non-parquet file
                raise DataError(f"--streaming: cannot read the parquet footer of {path}: {e}") from e
            s = meta.schema.to_arrow_schema()
            if schema is None:
                schema = s
            elif s.names != schema.names:
                raise DataError(f"--streaming: {path} has columns {s.names}, {self.files[0]} has {schema.names}; "
                                f"every shard needs the same columns")
            self.groups += [(f_id, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)]
        self.all_columns = list(schema.names)
        self.columns = list(columns) if columns else list(self.all_columns)
        sizes = np.array([n for _, _, n in self.groups], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(sizes)])
        self.length = int(self.starts[-1]) if max_rows is None else min(int(self.starts[-1]), max_rows)
        self.cached_groups = cached_groups
        self._tables: OrderedDict = OrderedDict()
        sig = [[os.path.abspath(p), os.path.getsize(p), os.stat(p).st_mtime_ns] for p in self.files]
        self._fingerprint = "parquet:" + hashlib.sha256(json.dumps([sig, self.length]).encode()).hexdigest()[:32]

    # what the rest of the data layer reads from a datasets.Dataset
    @property
    def column_names(self) -> list:
        return list(self.all_columns)

    def __len__(self) -> int:
        return self.length

    def __getstate__(self):  # loader workers read their own row groups
        return {**self.__dict__, "_tables": OrderedDict()}

    def select_columns(self, columns: list) -> "ParquetRows":
        out = ParquetRows.__new__(ParquetRows)
        out.__dict__.update(self.__getstate__())
        out.columns = [c for c in columns if c is not None]
        return out

    def head(self, n: int) -> "ParquetRows":
        """The first ``n`` rows (``--max_train_samples``)."""
        out = self.select_columns(self.columns)
        out.length = min(self.length, n)
        return out

    def group_sizes(self) -> list:
        """Rows of each row group within the first ``len(self)`` rows (the units the sampler windows)."""
        out = []
        for g in range(len(self.groups)):
            lo, hi = int(self.starts[g]), min(int(self.starts[g + 1]), self.length)
            if hi <= lo:
                break
            out.append(hi - lo)
        return out

    def _table(self, g: int):
        if g in self._tables:
            self._tables[g] = self._tables.pop(g)
            return self._tables[g]
        import pyarrow.parquet as pq

        f_id, group, _ = self.groups[g]
        table = pq.ParquetFile(self.files[f_id]).read_row_group(group, columns=self.columns)
        if len(self._tables) >= self.cached_groups:
            self._tables.popitem(last=False)
        self._tables[g] = table
        return table

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < self.length:
            raise IndexError(f"row {index} of {self.length}")
        g = int(np.searchsorted(self.starts, index, side="right") - 1)
        table = self._table(g)
        k = index - int(self.starts[g])
        return {c: table.column(c)[k].as_py() for c in self.columns}

    def stored_sizes(self) -> list | None:
        """``(h, w)`` of every row from the ``width`` / ``height`` columns (nothing else is read), or None
        when the data has no such columns."""
        if not all(c in self.all_columns for c in SIZE_COLUMNS):
            return None
        import pyarrow.parquet as pq

        out = []
        for path in self.files:
            t = pq.read_table(path, columns=list(SIZE_COLUMNS))
            out += list(zip(t.column("height").to_pylist(), t.column("width").to_pylist()))
            if len(out) >= self.length:
                break
        bad = next((i for i, (h, w) in enumerate(out[:self.length]) if not (isinstance(h, int) and isinstance(w, int)
                                                                              and h > 0 and w > 0)), None)
        if bad is not None:
            raise DataError(f"--aspect_ratio_buckets: row {bad} has no usable stored size (width={out[bad][1]!r}, "
                            f"height={out[bad][0]!r}); the 'width' and 'height' columns need positive integers")
        return out[:self.length]


def windows(group_sizes: list, buffer_rows: int) -> list:
    """Fixed windows of consecutive row groups, each holding at least ``buffer_rows`` rows (the last may be
    smaller and then joins the one before it)."""
    out, cur, rows = [], [], 0
    for g, n in enumerate(group_sizes):
        cur.append(g)
        rows += n
        if rows >= buffer_rows:
            out.append(cur)
            cur, rows = [], 0
    if cur:
        if out:
            out[-1] += cur
        else:
            out.append(cur)
    return out


class StreamingBatchSampler(_GlobalBatches):
    """Keys ``(epoch, index)`` (``(epoch, index, bucket)`` with ``bucket_of_row``), shuffled window by window
    (see module doc). Every global batch lies inside one window (and one bucket)."""

    def __init__(self, group_sizes: list, buffer_rows: int, per_device_batch: int, seed: int, world_size: int = 1,
                 rank: int = 0, bucket_of_row=None, shuffle: bool = True, start_position: int = 0):
        super().__init__(per_device_batch, seed, world_size, rank, shuffle, start_position)
        starts = np.concatenate([[0], np.cumsum(group_sizes)]).astype(np.int64)
        self.num_samples = int(starts[-1])
        self.of_row = None if bucket_of_row is None else np.asarray(bucket_of_row, dtype=np.int64)
        g = self.global_batch
        self.window_rows = []  # per window: {bucket: row ids}
        for groups in windows(list(group_sizes), buffer_rows):
            rows = np.arange(starts[groups[0]], starts[groups[-1] + 1])
            if self.of_row is None:
                self.window_rows.append({-1: rows})
            else:
                b = self.of_row[rows]
                self.window_rows.append({int(k): rows[b == k] for k in np.unique(b[b >= 0])})
        self.window_batches = [sum(len(r) // g for r in w.values()) for w in self.window_rows]
        self.batches_per_epoch = sum(self.window_batches)
        self.dropped_per_epoch = self.num_samples - self.batches_per_epoch * g
        self.max_groups_per_window = max(len(w) for w in windows(list(group_sizes), buffer_rows))
        if self.batches_per_epoch == 0:
            raise DataError(f"--train_batch_size: a global batch of {g} ({per_device_batch} x {world_size} "
                            f"processes) is larger than every shuffle window (bucket) of the data; lower the batch "
                            f"size or raise --shuffle_buffer_size")

    def plan(self, epoch: int):
        """[(rows of the batch as one array, bucket)] in the epoch's order."""
        g = self.global_batch
        order = np.arange(len(self.window_rows))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch, 2]).permutation(order)
        batches = []
        for w in order:
            mine = []
            for b, rows in self.window_rows[int(w)].items():
                if self.shuffle:
                    rows = np.random.default_rng([self.seed, epoch, 3, int(w), b]).permutation(rows)
                mine += [(rows[k * g:(k + 1) * g], b) for k in range(len(rows) // g)]
            if self.shuffle:
                mine = [mine[i] for i in np.random.default_rng([self.seed, epoch, 4, int(w)]).permutation(len(mine))]
            batches += mine
        return batches

    def keys(self, epoch, plan, k, lo, hi) -> list:
        rows, b = plan[k]
        if self.of_row is None:
            return [(epoch, int(i)) for i in rows[lo:hi]]
        return [(epoch, int(i), b) for i in rows[lo:hi]]


def check_streaming_args(a) -> None:
    """--streaming reads parquet given by --dataset_name (a folder, file or glob)."""
    if a.train_data_dir or a.local_data_dir:
        flag = "--train_data_dir" if a.train_data_dir else "--local_data_dir"
        raise UsageError(f"--streaming reads parquet shards given by --dataset_name (a folder, a file or a glob), "
                         f"not {flag}")


__all__ = ["ParquetRows", "SIZE_COLUMNS", "StreamingBatchSampler", "check_streaming_args", "parquet_files",
           "windows"]
