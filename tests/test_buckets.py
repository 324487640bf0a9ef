"""Aspect-ratio buckets: sizes, assignment from image headers, the bucket sampler and bucketed examples.

Everything here is in-process on tiny synthetic images (no model); the whole file takes a few seconds.
The images encode their own coordinates (red = column, green = row), so a crop can be checked pixel by
pixel against the coordinates the data set records.
"""
import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_npu.data.buckets import Buckets, assign_buckets, bucketize, image_sizes, make_buckets
from diffusers_npu.data.dataset import ImageCaptionDataset, collate
from diffusers_npu.data.sampling import BucketBatchSampler, ResumableBatchSampler
from diffusers_npu.errors import DataError, UsageError


def coord_image(h, w, blue=0):
    """RGB image whose pixel (y, x) is (x, y, blue): any crop reveals where it came from."""
    yy, xx = np.mgrid[0:h, 0:w]
    return Image.fromarray(np.stack([xx, yy, np.full_like(xx, blue)], -1).astype(np.uint8))


def png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


# Three aspect ratios for resolution 32 / multiple 8, i.e. buckets (40, 24) tall, (32, 32), (24, 40) wide.
# Each image needs no resize for its bucket (one side already matches), so crops are plain slices.
SHAPES = [(50, 24)] * 9 + [(32, 37)] * 13 + [(24, 46)] * 7


@pytest.fixture(scope="module")
def rows():
    from datasets import Dataset, Features, Image as ImageFeature, Value

    images = [coord_image(h, w, blue=i) for i, (h, w) in enumerate(SHAPES)]
    return Dataset.from_dict({"image": images, "text": [f"caption {i}" for i in range(len(images))]},
                             features=Features({"image": ImageFeature(), "text": Value("string")}))


@pytest.fixture(scope="module")
def buckets(rows):
    return bucketize(rows, "image", 32, multiple=8, progress=False)


# ------------------------------------------------------------------------------------------------ sizes
@pytest.mark.parametrize("resolution, multiple", [(512, 64), (768, 64), (1024, 64), (32, 8)])
def test_bucket_sizes_respect_the_multiple_the_area_and_the_ratio(resolution, multiple):
    sizes = make_buckets(resolution, multiple=multiple, max_ratio=2.0)
    assert (resolution, resolution) in sizes
    for h, w in sizes:
        assert h % multiple == 0 and w % multiple == 0
        assert 0.9 * resolution ** 2 <= h * w <= resolution ** 2  # about the square's pixels, never more
        assert max(h, w) / min(h, w) <= 2.0
        assert (w, h) in sizes  # portrait and landscape alike
    ratios = [w / h for h, w in sizes]
    assert ratios == sorted(ratios) and len(sizes) >= 3


def test_sdxl_sizes_are_among_the_1024_buckets():
    sizes = make_buckets(1024, multiple=64, max_ratio=2.0)
    for hw in [(1152, 896), (1216, 832), (1344, 768), (896, 1152), (832, 1216), (768, 1344)]:
        assert hw in sizes


def test_bad_bucket_parameters_name_the_flag():
    with pytest.raises(UsageError, match=r"--resolution 500: .*multiple of 64"):
        make_buckets(500, multiple=64)
    with pytest.raises(UsageError, match="largest aspect ratio"):
        make_buckets(512, multiple=64, max_ratio=0.5)


def test_assignment_picks_the_closest_log_aspect_ratio():
    sizes = [(40, 24), (32, 32), (24, 40)]
    got = assign_buckets([(100, 50), (50, 100), (33, 31), (30, 40), None], sizes)
    assert got == [0, 2, 1, 2, -1]  # 30x40: |log .75 - log .6| = .22 < |log .75| = .29
    # The boundary between two buckets is the geometric mean of their ratios, not the arithmetic one.
    mid = math.sqrt(40 / 24)  # 1.29; the arithmetic mean would be 1.33
    assert assign_buckets([(mid * 1000 + 5, 1000), (mid * 1000 - 5, 1000), (1310, 1000)], sizes) == [0, 1, 0]


# --------------------------------------------------------------------------------------- image headers
def test_image_sizes_reads_headers_only_and_names_unreadable_files(tmp_path):
    good = tmp_path / "good.png"
    coord_image(20, 30).save(good)
    truncated = tmp_path / "truncated.png"  # a valid header, the pixel data cut off
    truncated.write_bytes(png_bytes(coord_image(64, 48))[:80])
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image at all")
    cells = [str(good), {"bytes": None, "path": str(truncated)}, png_bytes(coord_image(8, 9)), coord_image(5, 7)]
    assert image_sizes(cells, progress=False) == [(20, 30), (64, 48), (8, 9), (5, 7)]

    with pytest.raises(DataError, match=r"row 1 of the training data.*junk\.png"):
        image_sizes([str(good), str(junk)], progress=False)
    assert image_sizes([str(junk), str(good)], skip_bad=True, progress=False) == [None, (20, 30)]


def test_bucketize_from_a_dataset_column(rows, buckets):
    assert buckets.sizes == [(40, 24), (32, 32), (24, 40)]
    assert buckets.of_row == [0] * 9 + [1] * 13 + [2] * 7
    assert buckets.counts() == [9, 13, 7]
    assert buckets.describe() == "40x24: 9 rows, 32x32: 13 rows, 24x40: 7 rows"


# ---------------------------------------------------------------------------------------------- sampler
def take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_every_global_batch_comes_from_one_bucket_and_each_epoch_uses_rows_once(buckets):
    s = BucketBatchSampler(buckets.of_row, per_device_batch=2, seed=5, world_size=2, rank=0)
    g = 4
    assert s.batches_per_epoch == 9 // g + 13 // g + 7 // g == 6
    assert s.dropped_per_epoch == 9 % g + 13 % g + 7 % g == 5  # 29 rows, 24 used per epoch
    for epoch in range(3):
        batches = [s.global_batch_at(epoch * 6 + k) for k in range(6)]
        seen = []
        for batch in batches:
            assert len(batch) == g and {e for e, _, _ in batch} == {epoch}
            assert len({b for _, _, b in batch}) == 1
            assert all(buckets.of_row[i] == b for _, i, b in batch)
            seen += [i for _, i, _ in batch]
        assert len(seen) == len(set(seen)) == 24
    # The batch order is seeded per epoch and interleaves the buckets (not 2 tall, then 3 square, ...).
    orders = [[s.global_batch_at(e * 6 + k)[0][2] for k in range(6)] for e in range(8)]
    assert len({tuple(o) for o in orders}) > 1
    assert any(o != sorted(o) for o in orders)


def test_ranks_partition_the_same_global_batches_as_one_process(buckets):
    one = take(BucketBatchSampler(buckets.of_row, 4, seed=5), 20)
    r0 = take(BucketBatchSampler(buckets.of_row, 2, seed=5, world_size=2, rank=0), 20)
    r1 = take(BucketBatchSampler(buckets.of_row, 2, seed=5, world_size=2, rank=1), 20)
    assert [a + b for a, b in zip(r0, r1)] == one
    plain = take(ResumableBatchSampler(29, 4, seed=5), 20)
    p0 = take(ResumableBatchSampler(29, 2, seed=5, world_size=2, rank=0), 20)
    p1 = take(ResumableBatchSampler(29, 2, seed=5, world_size=2, rank=1), 20)
    assert [a + b for a, b in zip(p0, p1)] == plain


@pytest.mark.parametrize("cls", ["bucket", "plain"])
def test_resume_at_any_position_yields_the_same_remaining_keys(buckets, cls):
    def make(start):
        if cls == "bucket":
            s = BucketBatchSampler(buckets.of_row, 2, seed=9, world_size=2, rank=1)
        else:
            s = ResumableBatchSampler(29, 2, seed=9, world_size=2, rank=1)
        s.start_position = start  # the trainer sets it from the checkpoint
        return s

    full = take(make(0), 30)  # five epochs of the bucket sampler, across epoch boundaries
    for start in range(30):
        assert take(make(start), 30 - start) == full[start:]


def test_a_batch_larger_than_every_bucket_names_the_flag(buckets):
    with pytest.raises(DataError, match=r"--train_batch_size: a global batch of 14 \(7 x 2 processes\).*largest "
                                        r"holds 13"):
        BucketBatchSampler(buckets.of_row, 7, seed=0, world_size=2)
    with pytest.raises(DataError, match="--train_batch_size"):
        ResumableBatchSampler(5, 3, seed=0, world_size=2)


def test_rows_with_unreadable_headers_are_never_drawn():
    of_row = [0, -1, 0, 0, -1, 0]
    s = BucketBatchSampler(of_row, 2, seed=1)
    assert s.excluded == 2 and s.batches_per_epoch == 2
    drawn = {i for batch in take(s, 10) for _, i, _ in batch}
    assert drawn == {0, 2, 3, 5}


# ------------------------------------------------------------------------------------ bucketed examples
def decode_coords(pixels):
    """(x, y) planes of a coord_image crop from its [-1, 1] tensor."""
    v = torch.round((pixels + 1) * 127.5).to(torch.int64)
    return v[0], v[1]


def test_each_batch_has_one_shape_and_the_recorded_crop_is_the_crop_applied(rows, buckets):
    data = ImageCaptionDataset(rows, "image", "text", 32, random_flip=True, seed=3, buckets=buckets,
                               interpolation="nearest")
    flips = set()
    for rank in (0, 1):
        s = BucketBatchSampler(buckets.of_row, 2, seed=3, world_size=2, rank=rank)
        for keys in take(s, 12):  # two epochs
            batch = collate([data[k] for k in keys])
            h, w = buckets.sizes[keys[0][2]]
            assert batch["pixel_values"].shape == (2, 3, h, w)
            assert batch["target_size"].tolist() == [[h, w]] * 2
            for j, (epoch, index, _) in enumerate(keys):
                oh, ow = SHAPES[index]
                assert batch["original_size"][j].tolist() == [oh, ow]
                top, left = batch["crop_top_left"][j].tolist()
                assert 0 <= top <= oh - h and 0 <= left <= ow - w
                x, y = decode_coords(batch["pixel_values"][j])
                rows_idx, cols_idx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
                assert torch.equal(y, top + rows_idx)  # the rows the crop took
                flipped = data.flip_for(epoch, index)
                flips.add(flipped)
                # The corner is in the image the model sees (mirrored when flipped), as upstream SDXL records it.
                expect_x = (ow - 1 - left - cols_idx) if flipped else (left + cols_idx)
                assert torch.equal(x, expect_x)
    assert flips == {True, False}


def test_resized_rows_record_the_covering_size_and_key_without_bucket(buckets):
    rows = [coord_image(64, 74)]  # twice the square bucket's size (plus some): resized to 32 x 37
    data = ImageCaptionDataset([{"image": png_bytes(rows[0])}], "image", None, 32, center_crop=True,
                               buckets=Buckets([(32, 32)], [0]), interpolation="nearest")
    ex = data[(0, 0)]  # no bucket in the key: the row's own
    assert ex["original_size"].tolist() == [64, 74] and ex["target_size"].tolist() == [32, 32]
    assert ex["crop_top_left"].tolist() == [0, 2]  # round((37 - 32) / 2) = 2, as torchvision's CenterCrop
    x, y = decode_coords(ex["pixel_values"])
    assert torch.equal(x[0], 2 * (torch.arange(32) + 2) + 1)  # PIL nearest 2x down keeps odd source columns


def test_bucketed_resume_is_bit_identical_through_the_loader(rows, buckets):
    data = ImageCaptionDataset(rows, "image", "text", 32, random_flip=True, seed=4, buckets=buckets)

    def batches(start, n):
        s = BucketBatchSampler(buckets.of_row, 2, seed=4)
        s.start_position = start
        loader = torch.utils.data.DataLoader(data, batch_sampler=s, collate_fn=collate, num_workers=0)
        it = iter(loader)
        return [next(it) for _ in range(n)]

    straight = batches(0, 14)
    resumed = batches(9, 5)  # mid second epoch (12 batches per epoch)
    for a, b in zip(straight[9:], resumed):
        assert torch.equal(a["pixel_values"], b["pixel_values"])
        assert torch.equal(a["crop_top_left"], b["crop_top_left"]) and a["caption"] == b["caption"]
