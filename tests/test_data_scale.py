"""Data at scale: the sharded latent cache (checksums, repair, a build spread over ranks and resumed) and
streaming training from parquet shards (bucketed from stored sizes, pre-empted, resumed bit-identically).

The cache tests use fake encoders (in-process, a second or two); the training tests train the embedded
digits model for a few steps.
"""
import json
import logging
import os
import threading

import numpy as np
import pytest
import torch

from diffusers_npu.data import cache_build
from diffusers_npu.data.cache import CachedDataset, LatentCache
from diffusers_npu.data.dataset import ImageCaptionDataset
from test_data import coord_image, encoded, fake_encode_images, fake_encode_prompts


class Rows(list):
    _fingerprint = "synthetic rows"  # what a datasets.Dataset carries (the cache key reads it)


def rows_of(n):
    # Distinct captions; every third row a list of options; one T5-like field of another shape per caption.
    return Rows([{"image": encoded(coord_image(20 + i % 5, 18, i)), "text": [f"cap {i}", f"alt {i}"] if i % 3 == 0
             else f"cap {i}"} for i in range(n)])


def two_field_prompts(captions):
    out = fake_encode_prompts(captions)
    out["t5_like"] = torch.arange(5 * 4, dtype=torch.float32).reshape(1, 5, 4) + \
        torch.tensor([float(sum(map(ord, c))) for c in captions])[:, None, None]
    return out


def examples(cache, seed=3, epochs=2):
    ds = CachedDataset(cache, seed, True)
    return [ds[(e, i)] for e in range(epochs) for i in range(len(ds))]


def same_examples(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]) if isinstance(x[k], torch.Tensor) else x[k] == y[k], k


class Counting:
    def __init__(self, fn):
        self.fn, self.calls, self.lock = fn, 0, threading.Lock()

    def __call__(self, x):
        with self.lock:
            self.calls += len(x)
        return self.fn(x)


def test_shards_are_read_row_by_row_and_a_damaged_one_is_rebuilt(tmp_path, caplog):
    rows = rows_of(23)
    data = ImageCaptionDataset(rows, "image", "text", 16, random_flip=True, seed=3)
    cache = LatentCache.load_or_build(str(tmp_path), {"m": 1}, data, fake_encode_images, two_field_prompts, True,
                                      progress=False, rows_per_shard=5)
    assert len(cache.shards) == 5 and cache.hit is False
    want = examples(cache)
    # Against the encoders directly: the centre crop of each orientation, the caption options' text outputs.
    for ex in want[:23]:
        i = ex["index"]
        online = data.transform(data.decode(i), (16, 16), True, data.flip_for(0, i), None)
        assert torch.equal(ex["latent_moments"], fake_encode_images(online["pixel_values"][None])[0])
        assert ex["caption"] == data.caption(0, i)
        for k, v in two_field_prompts([ex["caption"]]).items():
            assert torch.equal(ex[k], v[0]), k
    # The files are plain safetensors with the index's checksum.
    from safetensors.torch import load_file

    index = json.load(open(os.path.join(cache.folder, "index.json")))
    shard = load_file(os.path.join(cache.folder, index["shards"][2]["file"]))
    assert shard["moments"].shape == (5, 2, 6, 8, 8) and shard["text.t5_like"].shape[1:] == (5, 4)

    path = os.path.join(cache.folder, index["shards"][2]["file"])
    blob = bytearray(open(path, "rb").read())
    blob[-7] ^= 0xFF  # one flipped byte inside the tensor data
    open(path, "wb").write(bytes(blob))
    enc = Counting(fake_encode_images)
    # The handler goes on the package's logger itself: an earlier test's CLI run may have stopped it propagating
    data_logger = logging.getLogger("diffusers_npu.data")
    data_logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="diffusers_npu.data"):
            again = LatentCache.load_or_build(str(tmp_path), {"m": 1}, data, enc, two_field_prompts, True,
                                              progress=False)
    finally:
        data_logger.removeHandler(caplog.handler)
    records = list({id(r): r for r in caplog.records}.values())  # once, even when it also propagated to root
    warnings = [r.getMessage() for r in records if r.levelno >= logging.WARNING and r.name.startswith("diffusers_npu")]
    assert len(warnings) == 1 and "shard-00002.safetensors does not match its checksum" in warnings[0]
    assert again.hit is False and enc.calls == 2 * 5  # only the damaged shard, both orientations
    same_examples(examples(again), want)
    caplog.clear()
    third = LatentCache.load_or_build(str(tmp_path), {"m": 1}, data, enc, two_field_prompts, True, progress=False)
    assert third.hit is True and enc.calls == 10 and not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_an_interrupted_build_resumes_from_its_finished_shards(tmp_path, monkeypatch):
    rows = rows_of(25)
    data = ImageCaptionDataset(rows, "image", "text", 16)
    real = cache_build._encode_shard
    done = []

    def dies_at_80_percent(folder, s, *a):
        if s == 4:
            raise KeyboardInterrupt  # as a kill or a pre-emption would: after 4 of 5 shards
        done.append(s)
        return real(folder, s, *a)

    monkeypatch.setattr(cache_build, "_encode_shard", dies_at_80_percent)
    with pytest.raises(KeyboardInterrupt):
        LatentCache.load_or_build(str(tmp_path), {}, data, fake_encode_images, fake_encode_prompts, False,
                                  progress=False, rows_per_shard=5)
    folder = os.path.join(str(tmp_path), os.listdir(tmp_path)[0])
    assert done == [0, 1, 2, 3] and not os.path.exists(os.path.join(folder, "index.json"))
    assert not [f for f in os.listdir(folder) if ".tmp-" in f]  # the shard being written was removed
    monkeypatch.setattr(cache_build, "_encode_shard", real)
    enc = Counting(fake_encode_images)
    resumed = LatentCache.load_or_build(str(tmp_path), {}, data, enc, fake_encode_prompts, False, progress=False)
    assert enc.calls == 5  # the last shard only
    fresh = LatentCache.load_or_build(str(tmp_path / "fresh"), {}, data, fake_encode_images, fake_encode_prompts,
                                      False, progress=False, rows_per_shard=5)
    ds_a, ds_b = CachedDataset(resumed, 0, False), CachedDataset(fresh, 0, False)
    same_examples([ds_a[(0, i)] for i in range(25)], [ds_b[(0, i)] for i in range(25)])


def test_every_rank_builds_its_share_and_one_index_is_written(tmp_path, monkeypatch):
    """Two ranks (threads with a real barrier between them) build one cache: each encodes its shards only."""
    rows = rows_of(30)
    data = ImageCaptionDataset(rows, "image", "text", 16)
    barrier = threading.Barrier(2)
    writes = []
    real_index = cache_build.write_index
    monkeypatch.setattr(cache_build, "write_index", lambda *a: writes.append(1) or real_index(*a))
    encoders = [Counting(fake_encode_images), Counting(fake_encode_images)]
    caches, errors = [None, None], []

    def rank(r):
        try:
            caches[r] = LatentCache.load_or_build(str(tmp_path), {}, data, encoders[r], fake_encode_prompts, False,
                                                  progress=False, rank=r, world_size=2, barrier=barrier.wait,
                                                  rows_per_shard=4)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    # 8 shards (7 x 4 rows + 2): rank 0 encodes shards 0,2,4,6 (16 rows), rank 1 shards 1,3,5,7 (14 rows).
    assert [e.calls for e in encoders] == [16, 14] and writes == [1]
    single = LatentCache.load_or_build(str(tmp_path / "one"), {}, data, fake_encode_images, fake_encode_prompts,
                                       False, progress=False, rows_per_shard=4)
    for c in caches:
        same_examples([CachedDataset(c, 0, False)[(0, i)] for i in range(30)],
                      [CachedDataset(single, 0, False)[(0, i)] for i in range(30)])


def test_a_reader_holds_no_more_than_its_open_shards(tmp_path):
    """Reading every row of a cache keeps the process's tensors to the rows asked for: nothing is mapped."""
    rows = rows_of(12)
    data = ImageCaptionDataset(rows, "image", "text", 16)
    cache = LatentCache.load_or_build(str(tmp_path), {}, data, fake_encode_images, fake_encode_prompts, False,
                                      progress=False, rows_per_shard=2)
    for i in range(12):
        cache.moments_of(i, False)
    from diffusers_npu.data import cache as cache_mod

    assert len(cache._open) == min(6, cache_mod.OPEN_SHARDS)
    assert all(isinstance(r.fd, int) for r, _ in cache._open.values())
    import pickle

    clone = pickle.loads(pickle.dumps(cache))  # loader workers open their own files
    assert clone._open == {} and torch.equal(clone.moments_of(5, False), cache.moments_of(5, False))
    assert np.all(cache.row_shard.numpy() == np.repeat(np.arange(6), 2))


def test_training_from_a_repaired_cache_is_identical(tmp_path, monkeypatch, caplog):
    from trainkit import same_weights, train, weights

    monkeypatch.setattr(cache_build, "TARGET_SHARD_BYTES", 24 << 10)  # several shards from the digits
    flags = ["--cache_latents", "--cache_dir", tmp_path / "cache", "--max_train_samples", "96"]
    first = train("text_to_image", tmp_path / "a", *flags, steps=2)
    folder = first["cache"]["folder"]
    index = json.load(open(os.path.join(folder, "index.json")))
    assert len(index["shards"]) > 2
    path = os.path.join(folder, index["shards"][1]["file"])
    blob = bytearray(open(path, "rb").read())
    blob[len(blob) // 2] ^= 0x01
    open(path, "wb").write(bytes(blob))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        second = train("text_to_image", tmp_path / "b", *flags, steps=2)
    damaged = [r for r in caplog.records if "does not match its checksum" in r.getMessage()]
    assert len(damaged) == 1 and second["cache"] == {"folder": folder, "hit": False}
    assert same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"))


# ------------------------------------------------------------------------------------------ streaming
def write_parquet_shards(folder, embedded_paths, files=3, groups=2, rows_per_group=8, sizes=True):
    """Digits as parquet shards (files x row groups), square, wide and tall, with width/height columns."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import load_dataset
    from PIL import Image

    src = load_dataset(embedded_paths["dataset"], split="train")
    os.makedirs(folder, exist_ok=True)
    i = 0
    for f in range(files):
        table = []
        for _ in range(groups * rows_per_group):
            w, h = [(16, 16), (32, 16), (16, 32)][i % 3]
            buf = io.BytesIO()
            src[i]["image"].resize((w, h), Image.NEAREST).save(buf, "PNG")
            row = {"image": {"bytes": buf.getvalue(), "path": None}, "text": src[i]["text"]}
            if sizes:
                row.update(width=w, height=h)
            table.append(row)
            i += 1
        pq.write_table(pa.Table.from_pylist(table), os.path.join(folder, f"part-{f:05d}.parquet"),
                       row_group_size=rows_per_group)
    return folder


def test_streaming_buckets_from_stored_sizes_and_resumes_bit_identically(tmp_path, monkeypatch, embedded_paths):
    import signal

    from diffusers_npu.data import buckets as buckets_mod
    from diffusers_npu.train.loop import Trainer
    from diffusers_npu.train.tasks.text_to_image import TextToImageModule
    from trainkit import argv, main_rc, same_weights, train, weights

    data = write_parquet_shards(str(tmp_path / "shards"), embedded_paths)
    monkeypatch.setattr(buckets_mod, "image_sizes", lambda *a, **k: pytest.fail("an image header was opened"))
    monkeypatch.setattr("datasets.load_dataset", lambda *a, **k: pytest.fail("the data set was copied locally"))
    seen = []
    real = TextToImageModule.forward

    def spy(self, batch):
        seen.append((tuple(batch["pixel_values"].shape[-2:]), batch["index"].tolist()))
        return real(self, batch)

    monkeypatch.setattr(TextToImageModule, "forward", spy)
    flags = ["--dataset_name", data, "--streaming", "--shuffle_buffer_size", "16", "--aspect_ratio_buckets",
             "--random_flip", "--resume_from_checkpoint", "latest"]
    train("text_to_image", tmp_path / "straight", *flags, steps=6, batch=2)
    assert len({s for s, _ in seen}) == 3  # three buckets from the stored sizes, one shape per batch
    for shape, index in seen:  # a batch lies in one window of 16 rows (2 row groups) and one bucket
        assert len({i // 16 for i in index}) == 1 and len({i % 3 for i in index}) == 1
    real_step, calls = Trainer.train_step, []

    def preempted(self, loader):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(self, loader)

    monkeypatch.setattr(Trainer, "train_step", preempted)
    rc, out, _ = main_rc("text_to_image", argv(tmp_path / "split", 6, *flags, batch=2))
    assert rc == 0 and json.load(open(tmp_path / "split" / "train_summary.json"))["exit_reason"] == "preempted"
    monkeypatch.setattr(Trainer, "train_step", real_step)
    train("text_to_image", tmp_path / "split", *flags, steps=6, batch=2)
    assert same_weights(weights(tmp_path / "straight"), weights(tmp_path / "split"))
    assert not same_weights(weights(tmp_path / "straight"), weights(embedded_paths["model"]))


def test_streaming_refuses_buckets_without_stored_sizes_and_other_sources(tmp_path, embedded_paths, capsys):
    from trainkit import argv, main_rc

    data = write_parquet_shards(str(tmp_path / "shards"), embedded_paths, files=1, groups=1, sizes=False)
    rc, _, err = main_rc("text_to_image", argv(tmp_path / "o", 1, "--dataset_name", data, "--streaming",
                                               "--aspect_ratio_buckets"), capsys)
    assert rc != 0 and err.strip().splitlines()[-1].startswith(
        "error: --aspect_ratio_buckets with --streaming needs the image sizes stored with the data: integer "
        "'width' and 'height' columns")
    rc, _, err = main_rc("text_to_image", argv(tmp_path / "o2", 1, "--dataset_name", str(tmp_path / "none"),
                                               "--streaming"), capsys)
    assert rc != 0 and "--streaming reads parquet shards, and there is no .parquet file there" in err
