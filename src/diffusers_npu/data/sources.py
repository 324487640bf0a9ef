"""Where training images and captions come from.

Four sources, one result (a ``datasets.Dataset`` with an image column and a caption column):

* ``--dataset_name``   a hub id, or a local folder / parquet file(s) read through ``load_dataset``
                       (this covers the original port's pokemon layout: ``data/train-0001.parquet`` +
                       ``dataset_infos.json``)
* ``--local_data_dir`` a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``,
                       read with ``load_from_disk``
* ``--train_data_dir`` an image folder with ``metadata.jsonl`` (``file_name`` + caption), read with the
                       ``imagefolder`` builder
"""
from __future__ import annotations

import os


class DataError(ValueError):
    """Bad training data: the message names the file, column or flag and what was expected."""


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
            return _pick_split(load_dataset(value, dataset_config_name, cache_dir=cache_dir),
                               f"--dataset_name {value}")
        if value.startswith((".", "/", "~")) or os.sep in value.strip("/").split("/", 1)[-1]:
            raise DataError(f"--dataset_name: {value} does not exist (expected a local folder, a data file "
                            f"or a hub id like 'user/name')")
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
