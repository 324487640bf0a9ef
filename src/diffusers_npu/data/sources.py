"""Where training images and captions come from.

Four sources, one result (a ``datasets.Dataset`` with an image column and a caption column):

* ``--dataset_name``   a hub id, or a local folder / parquet file(s) read through ``load_dataset``
                       (this covers the original port's pokemon layout: ``data/train-0001.parquet`` +
                       ``dataset_infos.json``)
* ``--local_data_dir`` a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``,
                       read with ``load_from_disk``
* ``--streaming``     with ``--dataset_name``: parquet shards read in place, as needed (:mod:`.streaming`)
* ``--train_data_dir`` an image folder with ``metadata.jsonl`` (``file_name`` + caption), read with the
                       ``imagefolder`` builder; every ``metadata.jsonl`` is checked first (see
                       :func:`check_metadata_jsonl`), because ``datasets`` reports an empty or mis-encoded one
                       as an ``IndexError`` or a generation error that names neither the file nor the line

:func:`load_training_data` is the one path from the data flags to rows: source, columns, ``--max_train_samples``
and raw (undecoded) image columns, so every task reports bad data the same way.
"""
from __future__ import annotations

import json
import os
from typing import NamedTuple

from ..errors import DataError, UsageError


def _pick_split(ds, what: str):
    from datasets import DatasetDict

    if isinstance(ds, DatasetDict):
        if "train" in ds:
            return ds["train"]
        if len(ds) == 1:
            return next(iter(ds.values()))
        raise DataError(f"{what}: has splits {sorted(ds)} and none is called 'train'")
    return ds


def load_source(dataset_name=None, local_data_dir=None, train_data_dir=None, dataset_config_name=None,
                cache_dir=None):
    """Load the training split from exactly one source (see module doc)."""
    given = [(f, v) for f, v in (("--dataset_name", dataset_name), ("--local_data_dir", local_data_dir),
                                 ("--train_data_dir", train_data_dir)) if v]
    if not given:
        raise DataError("no training data: give one of --dataset_name, --local_data_dir or --train_data_dir")
    if len(given) > 1:
        raise DataError(f"give only one data source, got {', '.join(f for f, _ in given)}")
    flag, value = given[0]
    try:
        if flag == "--local_data_dir":
            from datasets import load_from_disk

            if not os.path.isdir(value):
                raise DataError(f"--local_data_dir: {value} is not a folder (expected the output of "
                                f"datasets' save_to_disk)")
            return _pick_split(load_from_disk(value), f"--local_data_dir {value}")
        from datasets import load_dataset

        if flag == "--train_data_dir":
            if not os.path.isdir(value):
                raise DataError(f"--train_data_dir: {value} is not a folder (expected images + metadata.jsonl)")
            check_metadata_jsonl(value)
            ds = load_dataset("imagefolder", data_dir=value, cache_dir=cache_dir)
            return _pick_split(ds, f"--train_data_dir {value}")
        # --dataset_name: a local path (folder or parquet/json/csv file) or a hub id.
        if os.path.isfile(value):
            ext = os.path.splitext(value)[1].lstrip(".")
            builder = {"parquet": "parquet", "json": "json", "jsonl": "json", "csv": "csv"}.get(ext)
            if builder is None:
                raise DataError(f"--dataset_name: {value}: unsupported file type .{ext} "
                                f"(expected .parquet, .json, .jsonl or .csv, or a folder)")
            return _pick_split(load_dataset(builder, data_files=value, cache_dir=cache_dir), value)
        if os.path.isdir(value):
            if _looks_saved_to_disk(value):
                from datasets import load_from_disk

                return _pick_split(load_from_disk(value), f"--dataset_name {value}")
            check_metadata_jsonl(value)  # a local image folder is read by the same imagefolder builder
            return _pick_split(load_dataset(value, dataset_config_name, cache_dir=cache_dir),
                               f"--dataset_name {value}")
        missing = dataset_name_missing(value)
        if missing:
            raise DataError(missing)
        return _pick_split(load_dataset(value, dataset_config_name, cache_dir=cache_dir),
                           f"--dataset_name {value}")
    except DataError:
        raise
    except FileNotFoundError as e:
        raise DataError(f"{flag}: {value}: {e}") from e
    except Exception as e:  # datasets raises many types; keep the flag and value in the message
        if os.environ.get("HF_DATASETS_OFFLINE") == "1" or "connect" in str(e).lower():
            raise DataError(f"{flag}: could not load {value!r} ({type(e).__name__}: {e}); offline? give a "
                            f"local folder instead") from e
        raise DataError(f"{flag}: could not load {value!r}: {type(e).__name__}: {e}") from e


def dataset_name_missing(value: str):
    """The error line for a ``--dataset_name`` that is neither a local folder/file nor worth asking the Hub
    about: it looks like a path (``./x``, ``/x``, ``~/x``, ``a/b/c``, a data file name, or its first part is a
    local folder), or the Hub cannot be reached (offline, or HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set) --
    instead of datasets' minute of Hub retries. None when the value may be a Hub id worth looking up."""
    from ..model_folder import hub_is_reachable, looks_local

    first = value.split("/", 1)[0]
    pathlike = (looks_local(value) or value.lower().endswith((".parquet", ".json", ".jsonl", ".csv", ".arrow"))
                or ("/" in value and first and os.path.isdir(first)))
    if pathlike:
        return (f"--dataset_name: {value}: folder does not exist (expected a local folder, a data file or a Hub "
                f"id like 'user/name')")
    offline = os.environ.get("HF_DATASETS_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    if offline or not hub_is_reachable():
        return (f"--dataset_name: {value}: folder does not exist here, and the Hugging Face Hub cannot be reached "
                f"(no network, or offline mode is set) to look it up as a data set id; give a local folder")
    return None


def _looks_saved_to_disk(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, "dataset_dict.json")) or os.path.isfile(
        os.path.join(folder, "state.json"))


def resolve_columns(ds, image_column=None, caption_column=None, need_caption=True):
    """Pick the image and caption columns, defaulting to the first two columns as upstream does, and name the
    columns that exist when a requested one is missing."""
    cols = list(ds.column_names)
    if len(ds) == 0:
        raise DataError("the training data set is empty (0 rows)")
    image_column = image_column or ("image" if "image" in cols else cols[0])
    if image_column not in cols:
        raise DataError(f"--image_column: no column {image_column!r}; the data set has columns: {', '.join(cols)}")
    if need_caption:
        default_caption = next((c for c in ("text", "caption", "prompt") if c in cols),
                               cols[1] if len(cols) > 1 else None)
        caption_column = caption_column or default_caption
        if caption_column not in cols:
            raise DataError(f"--caption_column: no column {caption_column!r}; the data set has columns: "
                            f"{', '.join(cols)}")
    return image_column, caption_column


def check_metadata_jsonl(folder: str) -> int:
    """Check every ``metadata.jsonl`` under ``folder`` as the ``imagefolder`` builder will read it: UTF-8
    (a BOM is fine), at least one record, one JSON object per non-blank line whose ``file_name`` (or
    ``<column>_file_name``, or a ``*file_names`` list) names files next to the metadata file. Returns the
    number of records; a :class:`DataError` names the file and the line."""
    total = 0
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if "metadata.jsonl" in files:
            total += _check_one_metadata(os.path.join(root, "metadata.jsonl"))
    return total


def _check_one_metadata(path: str) -> int:
    with open(path, "rb") as f:
        raw = f.read()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    records = 0
    for number, line in enumerate(raw.split(b"\n"), start=1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}, line {number}: not UTF-8 (byte 0x{line[e.start]:02x} at column "
                            f"{e.start + 1}); save the file as UTF-8") from e
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {number}: not valid JSON ({e.msg} at column {e.colno})") from e
        # The keys imagefolder reads images from: file_name, <column>_file_name, and their *_names lists.
        refs = {k: v for k, v in record.items() if k.endswith(("file_name", "file_names"))} \
            if isinstance(record, dict) else {}
        if not refs:
            raise DataError(f"{path}, line {number}: expected a JSON object with a \"file_name\" (or "
                            f"\"<column>_file_name\") key, got {text.strip()[:80]}")
        for key, value in refs.items():
            for name in (value if isinstance(value, list) else [value]):
                if not isinstance(name, str) or not os.path.isfile(os.path.join(os.path.dirname(path), name)):
                    raise DataError(f"{path}, line {number}: {key} {name!r} does not exist in "
                                    f"{os.path.dirname(path)}")
        records += 1
    if records == 0:
        raise DataError(f"{path}, line 1: the file is empty (expected one JSON object per line, e.g. "
                        f'{{"file_name": "0001.png", "text": "a caption"}})')
    return records


def check_max_train_samples(value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise UsageError(f"--max_train_samples must be a positive integer (got {value!r})")


def select_rows(ds, max_train_samples):
    """The first ``--max_train_samples`` rows (all when None)."""
    check_max_train_samples(max_train_samples)
    if max_train_samples is None:
        return ds
    return ds.select(range(min(max_train_samples, len(ds)))) if max_train_samples < len(ds) else ds


class TrainingData(NamedTuple):
    ds: object  # datasets.Dataset, image columns undecoded (raw bytes/paths)
    image_column: str
    caption_column: str | None


def load_training_data(dataset_name=None, local_data_dir=None, train_data_dir=None, dataset_config_name=None,
                       cache_dir=None, image_column=None, caption_column=None, max_train_samples=None,
                       need_caption=True, image_columns=()) -> TrainingData:
    """The rows a task trains on: :func:`load_source`, :func:`resolve_columns`, :func:`select_rows`, and the
    image column plus ``image_columns`` (e.g. ControlNet's conditioning column) left undecoded so that *we*
    decode them (a corrupt file is then a named DataError or skipped by --skip_bad_images)."""
    from .dataset import undecoded

    check_max_train_samples(max_train_samples)  # before any data is read
    ds = load_source(dataset_name, local_data_dir, train_data_dir, dataset_config_name, cache_dir=cache_dir)
    image_column, caption_column = resolve_columns(ds, image_column, caption_column, need_caption=need_caption)
    ds = select_rows(ds, max_train_samples)
    if caption_column is not None:
        warn_empty_captions(ds, caption_column)
    ds = undecoded(ds, [image_column, *image_columns])
    return TrainingData(ds, image_column, caption_column)


#: share of empty captions from which a run is warned (all empty: the model learns no text conditioning)
EMPTY_CAPTIONS_WARN = 0.5


def _is_empty(value) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_is_empty(v) for v in value)
    return value is None or (isinstance(value, str) and not value.strip())


def warn_empty_captions(ds, column: str) -> float:
    """One warning line (main process) when all, or at least half, of the captions trained on are empty.
    Returns the empty share."""
    import logging

    values = list(ds.select_columns([column])[column]) if hasattr(ds, "select_columns") else \
        [ds[i][column] for i in range(len(ds))]
    empty = sum(_is_empty(v) for v in values)
    share = empty / len(values) if values else 0.0
    if share >= EMPTY_CAPTIONS_WARN and os.environ.get("RANK", "0") == "0":
        what = "every caption" if empty == len(values) else f"{empty} of {len(values)} captions ({share:.0%})"
        logging.getLogger(__name__).warning(
            "caption column %r: %s of the training data %s empty: the model learns to ignore the prompt for "
            "them; check --caption_column", column, what, "is" if empty == len(values) else "are")
    return share


def load_streaming_rows(dataset_name, image_column=None, caption_column=None, max_train_samples=None,
                        need_caption=True, image_columns=()) -> TrainingData:
    """``--streaming``: the rows of the parquet shards ``dataset_name`` names (folder, file or glob), read in
    place (:class:`~.streaming.ParquetRows`), with the columns resolved as :func:`load_training_data` does."""
    from .streaming import ParquetRows, parquet_files

    check_max_train_samples(max_train_samples)
    if not dataset_name:
        raise DataError("--streaming reads parquet shards: give --dataset_name (a folder of .parquet files, a "
                        "file or a glob)")
    rows = ParquetRows(parquet_files(dataset_name))
    image_column, caption_column = resolve_columns(rows, image_column, caption_column, need_caption=need_caption)
    if max_train_samples is not None:
        rows = rows.head(max_train_samples)
    rows = rows.select_columns([image_column, caption_column, *image_columns])
    return TrainingData(rows, image_column, caption_column)


__all__ = ["DataError", "TrainingData", "check_max_train_samples", "check_metadata_jsonl", "load_source",
           "load_streaming_rows", "load_training_data", "resolve_columns", "select_rows"]
