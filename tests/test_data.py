"""The data layer: image decoding, metadata checks, image folders, examples, paired columns, latent cache.

In-process, synthetic images, no model (the cache is exercised with fake encode functions); a few seconds.
Decoded values are compared with numpy references, files with what PIL reads back, errors with their text.
"""
import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_npu.data.buckets import bucketize
from diffusers_npu.data.cache import CachedDataset, LatentCache
from diffusers_npu.data.dataset import ImageCaptionDataset, collate, sample_rng
from diffusers_npu.data.images import (DEFAULT_INTERPOLATION, INTERPOLATIONS, list_images, load_pil, resize_crop,
                                       to_tensor, write_images)
from diffusers_npu.data.sources import check_metadata_jsonl, load_source, load_training_data, select_rows
from diffusers_npu.errors import DataError, UsageError


def encoded(img, fmt="PNG"):
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def rgb(img):
    return np.asarray(img).astype(np.int64)


# --------------------------------------------------------------------------------------------- decoding
def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 24 * 32).round().astype(np.uint16).reshape(24, 32)
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode == "I;16"  # really a 16-bit file
    want = np.rint(ramp / 257.0).astype(np.int64)
    for cell in (str(path), {"bytes": None, "path": str(path)}, path.read_bytes()):
        got = rgb(load_pil(cell, "row 0"))
        assert got.shape == (24, 32, 3)
        assert np.array_equal(got[..., 0], want) and np.array_equal(got[..., 2], want)
    assert got.mean() == pytest.approx(127.5, abs=1)  # PIL's convert("RGB") makes this ~254 (white)
    big_endian = Image.frombytes("I;16B", (32, 24), ramp.astype(">u2").tobytes())
    assert np.array_equal(rgb(load_pil(big_endian, "x"))[..., 1], want)


def test_32_bit_integer_images_with_16_bit_values_scale_and_others_are_refused():
    vals = np.array([[0, 257, 32896, 65535]], dtype=np.int32)
    assert rgb(load_pil(Image.fromarray(vals), "x"))[0, :, 0].tolist() == [0, 1, 128, 255]
    with pytest.raises(DataError, match=r"row 4 \(column 'image'\).*values -5\.\.70000.*0\.\.65535"):
        load_pil(Image.fromarray(np.array([[-5, 70000]], dtype=np.int32)), "row 4 (column 'image')")


def test_float_tiff_in_unit_range_and_pil_range(tmp_path):
    unit = np.linspace(0, 1, 40, dtype=np.float32).reshape(5, 8)
    path = tmp_path / "f.tif"
    Image.fromarray(unit).save(path)
    assert Image.open(path).mode == "F"
    assert np.array_equal(rgb(load_pil(str(path), "x"))[..., 1], np.rint(unit.astype(np.float64) * 255))
    wide = unit * 200 + 3.4  # PIL's 0..255 convention (what convert("F") of an 8-bit image gives)
    assert np.array_equal(rgb(load_pil(Image.fromarray(wide), "x"))[..., 0], np.rint(wide.astype(np.float64)))
    for bad, text in [(unit - 0.5, r"values -0\.5\.\.0\.5: expected 0\.\.1"),
                      (np.full((2, 2), np.nan, np.float32), "NaN")]:
        with pytest.raises(DataError, match=text):
            load_pil(Image.fromarray(bad), "x")


def test_transparency_is_composited_on_white(tmp_path):
    pal = Image.new("P", (4, 2))
    pal.putpalette([255, 0, 0, 0, 200, 0] + [0] * 762)
    pal.putdata([0, 1, 0, 1, 1, 1, 0, 0])
    pal.info["transparency"] = 0  # palette entry 0 (red) is transparent
    path = tmp_path / "pal.png"
    pal.save(path, transparency=0)
    got = rgb(load_pil(str(path), "x"))
    assert got[0, 0].tolist() == [255, 255, 255] and got[0, 1].tolist() == [0, 200, 0]
    assert (got == 255).all(axis=-1).sum() == 4  # every transparent pixel is white, not red

    arr = np.zeros((2, 3, 4), np.uint8)
    arr[..., 0], arr[..., 3] = 200, [[0, 128, 255], [64, 192, 255]]
    alpha = arr[..., 3] / 255.0
    want_r, want_g = 200 * alpha + 255 * (1 - alpha), 255 * (1 - alpha)
    got = rgb(load_pil(encoded(Image.fromarray(arr, "RGBA")), "x")).astype(float)
    assert np.abs(got[..., 0] - want_r).max() <= 1 and np.abs(got[..., 1] - want_g).max() <= 1
    la = Image.fromarray(np.dstack([np.full((2, 2), 10, np.uint8), np.full((2, 2), 0, np.uint8)]), "LA")
    assert (rgb(load_pil(la, "x")) == 255).all()


def test_other_modes_convert():
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))
    assert rgb(load_pil(encoded(cmyk, "JPEG"), "x"))[0, 0].tolist() == pytest.approx([255, 0, 0], abs=3)
    gray = Image.fromarray(np.array([[0, 100], [200, 255]], np.uint8))
    got = rgb(load_pil(gray, "x"))
    assert np.array_equal(got[..., 0], got[..., 2]) and got[1, 0, 1] == 200


def test_undecodable_images_name_where_and_the_file(tmp_path):
    junk = tmp_path / "3.png"
    junk.write_bytes(b"this is not a png")
    with pytest.raises(DataError, match=r"cannot read image row 3 of the data \(column 'image'\) \(.*3\.png\)"):
        load_pil(str(junk), "row 3 of the data (column 'image')")
    cut = tmp_path / "cut.png"
    cut.write_bytes(encoded(Image.new("RGB", (64, 64), (1, 2, 3)))[:90])
    with pytest.raises(DataError, match=r"cut\.png"):
        load_pil({"bytes": cut.read_bytes(), "path": str(cut)}, "row 1")
    with pytest.raises(DataError, match="row 2.*empty image cell"):
        load_pil({"bytes": None, "path": None}, "row 2")


# --------------------------------------------------------------------------------------------- geometry
def test_resize_covers_the_target_and_reports_the_crop():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 50, 3), dtype=np.uint8))
    out, (top, left), orig = resize_crop(img, (20, 20), True, None, "bilinear")
    assert orig == (30, 50) and out.size == (20, 20)
    # Shorter side to 20: 20 x 33, centre crop at round(13 / 2) = 6 (torchvision's CenterCrop rounding).
    resized = img.resize((33, 20), Image.Resampling.BILINEAR)
    assert (top, left) == (0, 6)
    assert np.array_equal(np.asarray(out), np.asarray(resized)[:, 6:26])
    _, (top, left), _ = resize_crop(img, (20, 20), False, sample_rng(1, 2, 3, "crop"), "bilinear")
    assert top == 0 and 0 <= left <= 13
    t = to_tensor(out)
    assert t.shape == (3, 20, 20) and t.min() >= -1 and t.max() <= 1
    assert torch.allclose(to_tensor(out, unit=True) * 2 - 1, t, atol=1e-6)


def test_interpolation_names_match_upstream():
    assert DEFAULT_INTERPOLATION == "lanczos"  # upstream train_text_to_image.py's default
    assert set(INTERPOLATIONS) == {"bilinear", "bicubic", "box", "hamming", "lanczos", "nearest", "nearest_exact"}
    with pytest.raises(UsageError, match="--image_interpolation_mode: unknown mode 'cubic'"):
        ImageCaptionDataset([{"image": b""}], "image", None, 16, interpolation="cubic")


# ------------------------------------------------------------------------------------ metadata / sources
def _folder(tmp_path, lines: bytes, n=3):
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(n):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(root / f"{i}.png")
    (root / "metadata.jsonl").write_bytes(lines)
    return root


@pytest.mark.parametrize("content, line, text", [
    (b"", 1, "the file is empty"),
    (b"\n  \n", 1, "the file is empty"),
    (b'{"file_name": "0.png", "text": "a"}\n{"file_name": "1.png", "text": "caf\xe9"}\n', 2,
     r"not UTF-8 \(byte 0xe9 at column 36\)"),
    (b'{"file_name": "0.png", "text": "a"}\n\n{"file_name": "1.png", "text": "b",}\n', 3, "not valid JSON"),
    (b'{"file_name": "0.png"}\n["1.png"]\n', 2, 'expected a JSON object with a "file_name"'),
    (b'{"file_name": "0.png"}\n{"name": "1.png"}\n', 2, 'expected a JSON object with a "file_name"'),
    (b'{"file_name": "0.png", "hint_file_name": "1.png"}\n{"file_name": "1.png", "hint_file_name": "9.png"}', 2,
     "hint_file_name '9.png' does not exist"),
    (b'{"file_name": "0.png"}\n{"file_name": "7.png"}\n', 2, "file_name '7.png' does not exist"),
])
def test_bad_metadata_jsonl_names_file_and_line(tmp_path, content, line, text):
    root = _folder(tmp_path, content)
    for flag in ("train_data_dir", "dataset_name"):  # a local folder given as --dataset_name is an imagefolder too
        with pytest.raises(DataError, match=rf"metadata\.jsonl, line {line}: {text}"):
            load_source(**{flag: str(root)})


def test_good_metadata_with_bom_and_blank_lines_loads(tmp_path):
    lines = "\ufeff" + "\n".join(json.dumps({"file_name": f"{i}.png", "text": f"t{i}"}) + "\n" for i in range(3))
    root = _folder(tmp_path, lines.encode("utf-8"))
    assert check_metadata_jsonl(str(root)) == 3
    data = load_training_data(train_data_dir=str(root), max_train_samples=2)
    assert len(data.ds) == 2 and (data.image_column, data.caption_column) == ("image", "text")
    assert data.ds.features["image"].decode is False  # raw cells: our decoder names bad files
    assert rgb(load_pil(data.ds[1]["image"], "x"))[0, 0, 0] == 40


def test_max_train_samples_zero_names_the_flag():
    for bad in (0, -3):
        with pytest.raises(UsageError, match=rf"--max_train_samples must be a positive integer \(got {bad}\)"):
            load_training_data(dataset_name="nothing-is-read-first", max_train_samples=bad)
    assert select_rows(list(range(5)), None) == list(range(5))


# -------------------------------------------------------------------------------------- image folders
def test_write_images_replaces_the_folder_whole_and_keeps_it_on_failure(tmp_path):
    out = tmp_path / "instances"
    cells = [Image.new("RGB", (4, 4), (i, 0, 0)) for i in range(3)]
    write_images(cells, str(out))
    files = list_images(str(out), "--instance_data_dir")
    assert [os.path.basename(f) for f in files] == ["instance-000.png", "instance-001.png", "instance-002.png"]
    assert [Image.open(f).getpixel((0, 0)) for f in files] == [(0, 0, 0), (1, 0, 0), (2, 0, 0)]
    with pytest.raises(DataError, match="image 1"):
        write_images([cells[0], b"corrupt"], str(out))
    assert len(list_images(str(out), "x")) == 3  # the previous images are intact
    assert sorted(os.listdir(tmp_path)) == ["instances"]  # no temp folder left behind
    write_images(cells[:1], str(out))
    assert len(list_images(str(out), "x")) == 1
    with pytest.raises(DataError, match=r"--class_data_dir: .* holds no images"):
        list_images(str(tmp_path / "instances" / ".."), "--class_data_dir")
    assert list_images(str(tmp_path / "none"), "x", allow_empty=True) == []


# ------------------------------------------------------------------------------------------- examples
def coord_image(h, w, blue=0):
    yy, xx = np.mgrid[0:h, 0:w]
    return Image.fromarray(np.stack([xx, yy, np.full_like(xx, blue)], -1).astype(np.uint8))


def fake_tokenize(caption):
    return {"input_ids": torch.tensor([len(caption), sum(map(ord, caption)) % 1000])}


def test_examples_skip_bad_images_but_not_bad_captions():
    rows = [{"image": encoded(coord_image(16, 16, i)), "text": f"row {i}"} for i in range(4)]
    rows[1]["image"] = b"corrupt"
    with pytest.raises(DataError, match=r"row 1 of the training data \(column 'image'\)"):
        ImageCaptionDataset(rows, "image", "text", 16, tokenize=fake_tokenize)[(0, 1)]
    data = ImageCaptionDataset(rows, "image", "text", 16, tokenize=fake_tokenize, skip_bad_images=True)
    ex = data[(0, 1)]
    assert (ex["index"], ex["bad"], ex["caption"]) == (2, 1, "row 2")
    assert ex["input_ids"].tolist() == fake_tokenize("row 2")["input_ids"].tolist()
    batch = collate([data[(0, i)] for i in range(4)])
    assert batch["bad"] == 1 and type(batch["bad"]) is int
    assert batch["index"].tolist() == [0, 2, 2, 3] and batch["caption"] == ["row 0", "row 2", "row 2", "row 3"]
    assert batch["original_size"].tolist() == [[16, 16]] * 4 and batch["input_ids"].shape == (4, 2)
    rows[3]["text"] = 12
    with pytest.raises(DataError, match=r"caption row 3 .*column 'text'.*got int"):
        data[(0, 3)]


def test_caption_dropout_is_per_sample_and_deterministic():
    rows = [{"image": encoded(coord_image(8, 8)), "text": ["a", "b"]} for _ in range(40)]
    data = ImageCaptionDataset(rows, "image", "text", 8, proportion_empty_prompts=0.5, seed=2)
    caps = [data[(1, i)]["caption"] for i in range(40)]
    assert caps == [data[(1, i)]["caption"] for i in range(40)]
    assert 8 <= caps.count("") <= 32 and {"a", "b"} <= set(caps)


def test_collate_names_mixed_shapes():
    with pytest.raises(ValueError, match=r"'pixel_values' has shapes \[\(3, 8, 8\), \(3, 8, 16\)\].*Bucket"):
        collate([{"pixel_values": torch.zeros(3, 8, 8), "index": 0}, {"pixel_values": torch.zeros(3, 8, 16),
                                                                      "index": 1}])


# ------------------------------------------------------------------------------------- paired columns
def test_conditioning_gets_exactly_the_images_crop_and_flip():
    # The conditioning has the image's layout at twice its size (blue marks which is which): it must be
    # resized to the image's covering size, then cut at the same place and mirrored alike.
    rows = [{"image": encoded(coord_image(20, 36, i)), "text": "x", "conditioning_image": encoded(
        coord_image(20, 36, 100 + i).resize((72, 40), Image.Resampling.NEAREST))} for i in range(6)]
    data = ImageCaptionDataset(rows, "image", "text", 16, random_flip=True, seed=1, interpolation="nearest",
                               paired_columns={"conditioning_pixel_values": "conditioning_image"})
    lefts, flips = set(), set()
    for key in [(e, i) for e in range(4) for i in range(6)]:
        ex = data[key]
        cond = torch.round(ex["conditioning_pixel_values"] * 255).to(torch.int64)
        pix = torch.round((ex["pixel_values"] + 1) * 127.5).to(torch.int64)
        assert 0 <= cond.min() and cond.max() <= 255
        assert torch.equal(cond[:2], pix[:2])  # same source coordinates at every pixel
        assert (cond[2] == 100 + key[1]).all() and (pix[2] == key[1]).all()
        lefts.add(int(ex["crop_top_left"][1]))
        flips.add(data.flip_for(*key))
    assert len(lefts) > 3 and flips == {True, False}  # the crops and flips really vary


def test_bad_conditioning_image_is_named_or_skipped():
    rows = [{"image": encoded(coord_image(16, 16, i)), "text": "x", "hint": encoded(coord_image(16, 16))}
            for i in range(3)]
    rows[0]["hint"] = {"bytes": b"nope", "path": "/data/hints/0.png"}
    kw = dict(paired_columns={"conditioning_pixel_values": "hint"})
    with pytest.raises(DataError, match=r"row 0 of the training data \(column 'hint'\) \(/data/hints/0\.png\)"):
        ImageCaptionDataset(rows, "image", "text", 16, **kw)[(0, 0)]
    ex = ImageCaptionDataset(rows, "image", "text", 16, skip_bad_images=True, **kw)[(0, 0)]
    assert (ex["index"], ex["bad"]) == (1, 1)
    with pytest.raises(DataError, match="no column 'edges'; the data set has columns: image, text, hint"):
        from datasets import Dataset

        ImageCaptionDataset(Dataset.from_list([{"image": b"", "text": "", "hint": b""}]), "image", "text", 16,
                            paired_columns={"c": "edges"})


def test_derived_conditioning_follows_the_transformed_image():
    img = np.full((16, 24, 3), 0, np.uint8)
    img[4:12, 8:16] = 255  # a bright square in the middle
    data = ImageCaptionDataset([{"image": encoded(Image.fromarray(img))}], "image", None, 16, center_crop=True,
                               derived={"conditioning_pixel_values": "sobel"})
    ex = data[(0, 0)]
    edges = ex["conditioning_pixel_values"]
    assert edges.shape == (3, 16, 16) and edges.max() == 1 and edges[0, 8, 8] == 0
    assert ex["crop_top_left"].tolist() == [0, 4] and edges[0, 4, 6] > 0.5  # the square's edge, after the crop


# ------------------------------------------------------------------------------------------ the cache
def fake_encode_images(pixels):
    """Stand-in VAE: 2x2 mean pool as the 'mean', a constant 'std' (float32 CPU), [B, 2C, h/2, w/2]."""
    mean = torch.nn.functional.avg_pool2d(pixels.double(), 2).float()
    return torch.cat([mean, torch.full_like(mean, 0.25)], dim=1)


def fake_encode_prompts(captions):
    codes = torch.tensor([[float(sum(map(ord, c)) % 997), float(len(c))] for c in captions])
    return {"prompt_embeds": codes[:, None, :].repeat(1, 3, 1), "pooled_prompt_embeds": codes * 2}


def cache_rows(n_bad=0):
    shapes = [(40, 24)] * 4 + [(32, 32)] * 3 + [(24, 40)] * 3
    rows = [{"image": encoded(coord_image(h + 6, w + 4, i)), "text": [f"cap {i}", f"alt {i}"] if i % 3 == 0
             else f"cap {i}"} for i, (h, w) in enumerate(shapes)]
    for i in range(n_bad):
        noise = np.random.default_rng(i).integers(0, 255, (46, 28, 3), dtype=np.uint8)
        rows[1 + 4 * i]["image"] = encoded(Image.fromarray(noise))[:300]  # readable header, truncated pixels
    return rows


def test_latent_cache_round_trip_with_buckets_and_flips(tmp_path):
    rows = cache_rows()
    buckets = bucketize([r["image"] for r in rows], None, 32, multiple=8, progress=False)
    assert buckets.counts() == [4, 3, 3]
    data = ImageCaptionDataset(rows, "image", "text", 32, buckets=buckets, random_flip=True, seed=7)
    cache = LatentCache.load_or_build(str(tmp_path), {"model": "fake"}, data, fake_encode_images,
                                      fake_encode_prompts, True, progress=False)
    assert cache.hit is False and cache.num_flips == 2
    assert [tuple(cache.moments_of(i, True).shape) for i in (0, 4, 7)] == [(6, 20, 12), (6, 16, 16), (6, 12, 20)]
    empty = {k: v[0] for k, v in fake_encode_prompts([""]).items()}
    cached = CachedDataset(cache, seed=7, random_flip=True, proportion_empty_prompts=0.3, empty_prompt=empty)
    assert cached.bucket_of_row == buckets.of_row
    seen_flip, dropped = set(), 0
    for epoch in range(3):
        for i in range(10):
            b = buckets.of_row[i]
            ex = cached[(epoch, i, b)]
            flip = data.flip_for(epoch, i)
            seen_flip.add(flip)
            # The moments are the encoder's output on the deterministic centre crop of that orientation.
            online = data.transform(data.decode(i), buckets.sizes[b], True, flip, None)
            want = fake_encode_images(online["pixel_values"][None])[0]
            assert torch.equal(ex["latent_moments"], want)
            for field in ("original_size", "crop_top_left", "target_size"):
                assert torch.equal(ex[field], online[field]), field
            # Caption choice and dropout draw what the online path draws for the same key.
            text = ImageCaptionDataset(rows, "image", "text", 32, buckets=buckets, seed=7,
                                       proportion_empty_prompts=0.3)[(epoch, i, b)]["caption"]
            assert ex["caption"] == text
            dropped += text == ""
            want_text = empty if text == "" else {k: v[0] for k, v in fake_encode_prompts([text]).items()}
            for k, v in want_text.items():
                assert torch.equal(ex[k], v), k
    assert seen_flip == {True, False} and dropped > 0

    def refuse(*_):
        raise AssertionError("a cache hit must not encode anything")

    again = LatentCache.load_or_build(str(tmp_path), {"model": "fake"}, data, refuse, refuse, True, progress=False)
    assert again.hit is True and again.folder == cache.folder
    # The key follows resolution, bucket sizes and assignment, flip and the task's parts.
    folders = {cache.folder}
    variants = [
        ({"model": "fake"}, ImageCaptionDataset(rows, "image", "text", 32, random_flip=True), True),
        ({"model": "fake"}, ImageCaptionDataset(rows, "image", "text", 32, buckets=buckets._replace(
            of_row=[1] + buckets.of_row[1:]), random_flip=True), True),
        ({"model": "fake"}, ImageCaptionDataset(rows, "image", "text", 32, buckets=buckets._replace(
            sizes=[(48, 16), (32, 32), (16, 48)])), True),
        ({"model": "fake"}, data, False),
        ({"model": "other"}, data, True),
    ]
    for parts, ds, flip in variants:
        c = LatentCache.load_or_build(str(tmp_path), parts, ds, fake_encode_images, fake_encode_prompts, flip,
                                      progress=False)
        assert c.hit is False and c.folder not in folders
        folders.add(c.folder)
    key = json.load(open(os.path.join(cache.folder, "key.json")))
    assert key["data"]["buckets"] == [[40, 24], [32, 32], [24, 40]] and key["task"] == {"model": "fake"}


def test_latent_cache_leaves_out_bad_rows_and_stands_in_like_online(tmp_path):
    rows = cache_rows(n_bad=2)  # rows 1 and 5 are truncated
    buckets = bucketize([r["image"] for r in rows], None, 32, multiple=8, progress=False)
    strict = ImageCaptionDataset(rows, "image", "text", 32, buckets=buckets)
    with pytest.raises(DataError, match=r"row 1 of the training data \(column 'image'\)"):
        LatentCache.load_or_build(str(tmp_path), {}, strict, fake_encode_images, fake_encode_prompts, False,
                                  progress=False)
    assert not any(f == "index.json" for _, _, fs in os.walk(tmp_path) for f in fs)  # never complete
    data = ImageCaptionDataset(rows, "image", "text", 32, buckets=buckets, skip_bad_images=True)
    cache = LatentCache.load_or_build(str(tmp_path), {}, data, fake_encode_images, fake_encode_prompts, False,
                                      progress=False)
    assert cache.row_pos.tolist().count(-1) == 2
    cached = CachedDataset(cache, seed=0, random_flip=False)
    for i in (1, 5):
        ex, online = cached[(0, i, buckets.of_row[i])], data[(0, i, buckets.of_row[i])]
        assert (ex["index"], ex["bad"]) == (online["index"], online["bad"]) and ex["bad"] == 1
    with pytest.raises(ValueError, match="built without flips"):
        CachedDataset(cache, seed=0, random_flip=True)
    with pytest.raises(DataError, match=r"row 1 of the training data"):  # without the flag: no silent stand-ins
        LatentCache.load_or_build(str(tmp_path), {}, strict, fake_encode_images, fake_encode_prompts, False,
                                  progress=False)


def test_legacy_square_cache_view(tmp_path):
    rows = [{"image": encoded(coord_image(20, 16, i)), "text": f"c{i}"} for i in range(3)]
    data = ImageCaptionDataset(rows, "image", "text", 16)
    cache = LatentCache.load_or_build(str(tmp_path), {"m": 1}, data, fake_encode_images, fake_encode_prompts,
                                      False, progress=False)
    assert tuple(cache.stacked_moments().shape) == (3, 1, 6, 8, 8)  # [rows, orientations, 2C, h, w]
    ex = CachedDataset(cache, 0, False)[(0, 2)]
    assert "caption" in ex and ex["target_size"].tolist() == [16, 16]


def test_sd_encode_helpers_cache_what_the_vae_and_text_encoder_give(tmp_path):
    from diffusers_npu.data.cache import clip_prompts_fn, model_key_parts, vae_moments_fn
    from diffusers_npu.data.dataset import ClipTokenize
    from diffusers_npu.presets import build_components

    c = build_components("tiny", tokenizer_dir=str(tmp_path / "tok"))
    vae, te, tok = c["vae"].eval(), c["text_encoder"].eval(), c["tokenizer"]
    rows = [{"image": encoded(coord_image(40, 36, i)), "text": "a photo"} for i in range(3)]
    data = ImageCaptionDataset(rows, "image", "text", 32, tokenize=ClipTokenize(tok), random_flip=True)
    cache = LatentCache.load_or_build(str(tmp_path / "cache"), {"model": "tiny"}, data,
                                      vae_moments_fn(vae, torch.device("cpu"), torch.float32),
                                      clip_prompts_fn(tok, te, torch.device("cpu")), True, progress=False)
    for epoch in range(4):
        ex = CachedDataset(cache, 0, True)[(epoch, 1)]
        online = data.transform(data.decode(1), (32, 32), True, data.flip_for(epoch, 1), None)
        with torch.no_grad():
            dist = vae.encode(online["pixel_values"][None]).latent_dist
            states = te(data[(epoch, 1)]["input_ids"][None])[0][0]
        torch.testing.assert_close(ex["latent_moments"], torch.cat([dist.mean, dist.std], 1)[0], atol=1e-5,
                                   rtol=1e-4)
        torch.testing.assert_close(ex["encoder_hidden_states"], states)

    # Model files rewritten in place (same size, same second) change the key parts.
    folder = tmp_path / "model" / "vae"
    folder.mkdir(parents=True)
    (folder / "w.bin").write_bytes(b"1234")
    before = model_key_parts(str(tmp_path / "model"))
    os.utime(folder / "w.bin", ns=(1, os.stat(folder / "w.bin").st_mtime_ns + 1))
    assert model_key_parts(str(tmp_path / "model")) != before
