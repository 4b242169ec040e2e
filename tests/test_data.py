"""Datasets: the three layouts, robust decoding of the bad-input corpus, and the dropping collate.

``make_bad_corpus`` is shared with the predict and eval tests.
"""

from __future__ import annotations

import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hrnet.data import (DatasetError, Failed, ImageDataset, ImageList, ImageReadError, Sample, collate,
                        imagenet_names, imagenet_wnids, load_image)

SITE = os.path.dirname(os.path.dirname(np.__file__))
PHOTO = os.path.join(SITE, "sklearn/datasets/images/china.jpg")


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width x height`` and holds no pixel data: enough to trip PIL's bomb check."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + \
        chunk(b"IEND", b"")


def make_bad_corpus(d: Path) -> tuple[dict[str, tuple], list[str]]:
    """Write the issue's awkward files into ``d``.

    Returns ``{name: expected (R, G, B) of the decoded bottom-left pixel}`` for the files that must decode,
    and the names of the files that must be reported.
    """
    d.mkdir(parents=True, exist_ok=True)
    good: dict[str, tuple] = {}
    Image.new("CMYK", (64, 48), (0, 255, 255, 0)).save(d / "cmyk.jpg", quality=100)  # pure red in CMYK
    good["cmyk.jpg"] = (255, 0, 0)
    grey16 = np.full((40, 50), 51400, dtype=np.uint16)  # 51400 / 257 = 200 exactly
    Image.fromarray(grey16).save(d / "grey16.png")
    good["grey16.png"] = (200, 200, 200)
    Image.new("L", (50, 40), 77).save(d / "grey.png")
    good["grey.png"] = (77, 77, 77)
    Image.new("RGBA", (50, 40), (10, 20, 30, 0)).save(d / "rgba.png")
    good["rgba.png"] = (10, 20, 30)
    pal = Image.new("P", (50, 40), 1)
    pal.putpalette([0, 0, 0, 90, 60, 30] + [0] * 762)
    pal.save(d / "palette.png", transparency=0)
    good["palette.png"] = (90, 60, 30)
    frames = [Image.new("RGB", (32, 32), c) for c in ((0, 0, 255), (255, 255, 0))]
    frames[0].save(d / "animated.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    good["animated.gif"] = (0, 0, 255)
    rotated = Image.new("RGB", (60, 30), (0, 0, 0))
    rotated.paste((0, 255, 0), (0, 0, 10, 10))  # green in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise: the green corner moves to the top right
    rotated.save(d / "exif_rotated.jpg", exif=exif, quality=100)
    good["exif_rotated.jpg"] = (0, 0, 0)
    Image.new("RGB", (1, 1), (5, 6, 7)).save(d / "one_pixel.png")
    good["one_pixel.png"] = (5, 6, 7)

    (d / "zero.jpg").write_bytes(b"")
    data = open(PHOTO, "rb").read()
    (d / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (d / "random.jpg").write_bytes(np.random.default_rng(0).bytes(5000))
    (d / "text.png").write_text("this is not an image\n")
    (d / "bomb.png").write_bytes(_png_header_only(20000, 20000))  # 4e8 px: PIL's DecompressionBombError
    (d / "bomb_warning.png").write_bytes(_png_header_only(10000, 9000))  # 9e7 px: PIL only warns
    bad = ["zero.jpg", "truncated.jpg", "random.jpg", "text.png", "bomb.png", "bomb_warning.png"]
    return good, bad


def test_imagenet_class_table():
    wnids, names = imagenet_wnids(), imagenet_names()
    assert len(wnids) == len(set(wnids)) == len(names) == 1000
    assert list(wnids) == sorted(wnids)
    assert (wnids[0], names[0]) == ("n01440764", "tench, Tinca tinca")
    assert wnids[999] == "n15075141" and names[999].startswith("toilet tissue")


def test_bad_corpus_decodes_or_reports_one_line_naming_the_file(tmp_path):
    good, bad = make_bad_corpus(tmp_path)
    for name, rgb in good.items():
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no PIL warnings leak out (palette transparency, bombs)
            img = load_image(tmp_path / name)
        assert img.mode == "RGB", name
        assert np.abs(np.asarray(img)[-1, 0].astype(int) - rgb).max() <= 3, (name, np.asarray(img)[-1, 0])
    rot = np.asarray(load_image(tmp_path / "exif_rotated.jpg"))
    assert rot.shape == (60, 30, 3) and rot[3, -3, 1] > 200 and rot[3, 3, 1] < 50
    for name in bad:
        with pytest.raises(ImageReadError) as e:
            load_image(tmp_path / name)
        msg = str(e.value)
        assert str(tmp_path / name) in msg and "\n" not in msg, msg
    assert "empty" in str(pytest.raises(ImageReadError, load_image, tmp_path / "zero.jpg").value)
    assert "bomb" in str(pytest.raises(ImageReadError, load_image, tmp_path / "bomb_warning.png").value)


def test_fifo_is_reported_not_waited_on(tmp_path):
    os.mkfifo(tmp_path / "pipe.jpg")
    with pytest.raises(ImageReadError, match="not a regular file"):
        load_image(tmp_path / "pipe.jpg")


def _tree(root: Path, classes: dict[str, int]) -> None:
    for c, n in classes.items():
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (i, 0, 0)).save(root / c / f"{i}.png")


def test_imagenet_layout_labels_by_index_among_all_1000_wnids(tmp_path):
    wnids = imagenet_wnids()
    _tree(tmp_path, {wnids[3]: 2, wnids[500]: 1, wnids[999]: 1})
    (tmp_path / wnids[3] / "notes.txt").write_text("ignored: not an image extension")
    ds = ImageDataset(tmp_path)
    assert ds.layout == "imagenet" and len(ds.classes) == 1000
    assert [label for _, label in ds.samples] == [3, 3, 500, 999]
    assert ds.samples[0][0] == str(tmp_path / wnids[3] / "0.png")


def test_class_per_folder_layout_uses_sorted_folder_names(tmp_path):
    _tree(tmp_path, {"dog": 1, "cat": 2, "n01440764": 1})
    ds = ImageDataset(tmp_path)
    assert ds.layout == "folders" and ds.classes == ["cat", "dog", "n01440764"]
    assert [label for _, label in ds.samples] == [0, 0, 1, 2]


def test_annotation_file_layout(tmp_path):
    _tree(tmp_path, {"imgs": 3})
    ann = tmp_path / "val.txt"
    ann.write_text("imgs/2.png 7\n\nimgs/0.png 0\n")
    ds = ImageDataset(tmp_path, ann_file=ann)
    assert ds.samples == [(str(tmp_path / "imgs/2.png"), 7), (str(tmp_path / "imgs/0.png"), 0)]
    assert len(ds.classes) == 8
    ann.write_text("imgs/2.png seven\n")
    with pytest.raises(DatasetError, match=r"val.txt:1"):
        ImageDataset(tmp_path, ann_file=ann)


def test_missing_or_empty_data_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        ImageDataset(tmp_path / "nope")
    with pytest.raises(DatasetError, match="no images"):
        ImageDataset(tmp_path)


def test_items_and_collate_drop_bad_files(tmp_path):
    good, bad = make_bad_corpus(tmp_path / "x")
    files = [tmp_path / "x" / n for n in [*good, *bad]]
    ds = ImageList(files, transform=lambda im: torch.tensor(np.asarray(im.resize((4, 4)))))
    items = [ds[i] for i in range(len(ds))]
    assert all(isinstance(s, Sample) for s in items[: len(good)])
    assert all(isinstance(s, Failed) for s in items[len(good):])
    batch = collate(items)
    assert batch.images.shape == (len(good), 4, 4, 3)
    assert batch.indices.tolist() == list(range(len(good)))
    assert [f.file for f in batch.failed] == [str(f) for f in files[len(good):]]
    empty = collate(items[len(good):])
    assert len(empty.images) == 0 and len(empty.failed) == len(bad)
    strict = ImageList(files, strict=True)
    with pytest.raises(ImageReadError, match="zero.jpg"):
        strict[len(good)]


def test_dataset_takes_any_transform_callable(tmp_path):
    _tree(tmp_path, {"a": 1})
    ds = ImageDataset(tmp_path, transform=lambda im: im.size)
    assert ds[0] == Sample((8, 8), 0, 0)
