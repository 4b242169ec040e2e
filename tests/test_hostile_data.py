"""Hostile and careless image data (issue 10): each test is one class of input that today's main
mislabels, counts twice, hangs on, exhausts memory with, or answers with a traceback.

Memory checks run in a child process whose address space is capped at what ``import torch, hrnet``
took plus 1 GB (``helpers.run_limited``); hang checks run there under a timeout.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import run_limited
from hrnet.cli import main
from hrnet.data import DatasetError, ImageDataset, imagenet_wnids, load_image
from hrnet import create_model
from hrnet.weights import save_checkpoint

MODEL = "hrnet-w18-small"
ODD = os.fsdecode(b"odd\xff")  # a name whose bytes are not UTF-8: Python holds it as 'odd\udcff'


def flat_png(path: Path, width: int, height: int, sample: bytes, bit_depth: int = 8) -> Path:
    """A greyscale PNG whose every pixel is ``sample`` (1 or 2 big-endian bytes), written a row at a
    time, so a 9000x9000 16-bit image costs a few MB to make and 160 KB on disk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    row, z = b"\x00" + sample * width, zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def image(path: Path, value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (value, 0, 0)).save(path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """Random 3-class weights: the CLI runs end to end without any download."""
    torch.manual_seed(0)
    return str(save_checkpoint(create_model(MODEL, num_classes=3), tmp_path_factory.mktemp("ckpt") / "w3.safetensors"))


def test_stray_folders_in_an_imagenet_tree_are_refused_or_excluded_never_relabelled(tmp_path):
    # today: lost+found turns the tree into 'class folders' and every label shifts, with no word
    wnids = imagenet_wnids()
    for wnid, n in ((wnids[0], 2), (wnids[7], 1), (wnids[999], 1)):
        for i in range(n):
            image(tmp_path / wnid / f"{i}.png")
    image(tmp_path / wnids[0] / ".hidden.png")
    for stray in ("lost+found", ODD, ".ipynb_checkpoints", ".Trash-1000"):
        image(tmp_path / stray / "x.png")
    (tmp_path / ".DS_Store").write_bytes(b"\0")

    with pytest.raises(DatasetError) as e:
        ImageDataset(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "3 folders are ImageNet wnids and 2 are not: lost+found, odd\\xff" in msg, msg
    assert ".ipynb" not in msg and "exclude" in msg
    msg.encode("utf-8")  # printable as it stands

    ds = ImageDataset(tmp_path, exclude_unknown=True)
    assert ds.layout == "imagenet" and ds.excluded == ["lost+found", ODD]
    assert ds.samples == [(str(tmp_path / wnids[0] / "0.png"), 0), (str(tmp_path / wnids[0] / "1.png"), 0),
                          (str(tmp_path / wnids[7] / "0.png"), 7), (str(tmp_path / wnids[999] / "0.png"), 999)]

    for stray in ("lost+found", ODD):  # hidden folders alone never change the layout
        shutil.rmtree(tmp_path / stray)
    ds = ImageDataset(tmp_path)
    assert ds.layout == "imagenet" and [label for _, label in ds.samples] == [0, 0, 7, 999]


SCAN = """
import json
from hrnet.data import ImageDataset, find_images
ds = ImageDataset(sys.argv[1])
print(json.dumps({"samples": ds.samples, "found": find_images(sys.argv[1])}))
"""


@pytest.mark.slow
def test_symlink_loops_end_and_every_file_counts_once_under_its_own_folder(tmp_path):
    # today: 'self -> .' counts a.png 41 times, and with 'up -> ..' beside it the walk never ends
    w = imagenet_wnids()
    root, ext, flat = tmp_path / "val", tmp_path / "ext", tmp_path / "flat"
    a, b, c = image(root / w[0] / "a.png"), image(root / w[0] / "sub" / "b.png"), image(root / w[1] / "c.png")
    e, x = image(ext / "e.png"), image(flat / "x.png")
    os.symlink(".", root / w[0] / "self")
    os.symlink("..", root / w[0] / "up")
    os.symlink("../..", root / w[0] / "sub" / "top")
    os.symlink(f"../{w[0]}", root / w[1] / "other_class")  # a folder of another class: not walked again
    os.symlink(f"../{w[0]}/a.png", root / w[1] / "alias.png")  # a file of another class: counted there only
    os.symlink(ext, root / w[1] / "ext")  # a real folder outside the tree: followed, once
    os.symlink("..", ext / "back")  # ...which leads back out: to flat/ and to val/ itself
    (root / w[2]).mkdir()
    os.symlink(flat / "x.png", root / w[2] / "x.png")  # a class folder of links (a common val layout)

    done = run_limited(SCAN, str(root), timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout)
    want = [(str(a), 0), (str(b), 0), (str(c), 1), (str(root / w[1] / "ext" / "e.png"), 1),
            (str(root / w[2] / "x.png"), 2)]
    assert [tuple(s) for s in got["samples"]] == want
    assert got["found"] == sorted(path for path, _ in want)
    assert e.exists() and x.exists()


ANN = """
import json
from hrnet.data import ImageDataset
for ann in sys.argv[2:]:
    try:
        ImageDataset(sys.argv[1], ann_file=ann)
        print(json.dumps(["accepted", ann]))
    except Exception as e:
        print(json.dumps([type(e).__name__, str(e)]))
"""


@pytest.mark.slow
def test_annotation_files_with_absurd_labels_or_sizes_are_refused_by_line(tmp_path):
    image(tmp_path / "a.png")
    bomb = tmp_path / "bomb.txt"
    bomb.write_text("a.png 0\na.png 10000000000\n")  # today: a list of 1e10 class names, 18 GB
    huge = tmp_path / "huge.txt"
    with open(huge, "wb") as f:  # 2 GiB, sparse: today read into memory whole
        f.truncate(2 << 30)
    done = run_limited(ANN, str(tmp_path), str(bomb), str(huge), timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    (kind1, msg1), (kind2, msg2) = map(json.loads, done.stdout.splitlines())
    assert kind1 == "DatasetError" and f"{bomb}:2: label 10000000000 is not below 1000000" in msg1
    assert kind2 == "DatasetError" and "larger than an annotation file can be" in msg2

    ann = tmp_path / "ann.txt"
    for n, (text, why) in enumerate([("a.png -1", "label 0, 1, 2"), ("a.png 1.5", "label 0, 1, 2"),
                                     ("a.png ²", "label 0, 1, 2"),  # str.isdigit() says yes, int() raises
                                     ("a.png 1e3", "label 0, 1, 2"), ("a.png", "label 0, 1, 2"),
                                     ("a.png " + "9" * 5000, "is not below"),  # int() refuses > 4300 digits
                                     ("x" * 9000 + ".png 0", "line longer than")]):
        ann.write_text("a.png 0\n" * n + text + "\n")
        with pytest.raises(DatasetError, match=f"ann.txt:{n + 1}: .*{why}") as e:
            ImageDataset(tmp_path, ann_file=ann)
        assert "\n" not in str(e.value) and len(str(e.value)) < 400
    image(Path(os.fsdecode(bytes(tmp_path) + b"/b\xff.png")))  # today: UnicodeDecodeError on the file
    ann.write_bytes(b"a.png 0\nb\xff.png 2\n")
    ds = ImageDataset(tmp_path, ann_file=ann)
    assert ds.samples[1] == (os.fsdecode(bytes(tmp_path) + b"/b\xff.png"), 2) and ds[1].label == 2
    os.mkfifo(tmp_path / "fifo.txt")
    with pytest.raises(DatasetError, match="fifo.txt: not a regular file"):
        ImageDataset(tmp_path, ann_file=tmp_path / "fifo.txt")


IMAGES = """
import json, os
from PIL import Image
from hrnet.data import ImageList, collate
Image.MAX_IMAGE_PIXELS = None  # as some libraries do on import: hrnet's own limit must still hold
corners = lambda im: torch.tensor([im.getpixel((x, y)) for x in (0, im.width - 1) for y in (0, im.height - 1)])
ds = ImageList(sys.argv[1:], transform=corners)
batch = collate([ds[i] for i in range(len(ds))])
print(json.dumps({"indices": batch.indices.tolist(), "corners": batch.images.tolist(),
                  "failed": [[f.index, f.error] for f in batch.failed]}))
"""


@pytest.mark.slow
def test_images_that_exhaust_memory_are_refused_or_decoded_within_1GB(tmp_path):
    # today: the 16-bit PNG needs 1.9 GB (MemoryError under the cap), the 144 MP one decodes
    small = image(tmp_path / "small.png", 9)
    deep = flat_png(tmp_path / "deep16.png", 9000, 9000, (51400).to_bytes(2, "big"), bit_depth=16)  # 51400/257=200
    wide = flat_png(tmp_path / "144mp.png", 12000, 12000, b"\x07")
    os.mkfifo(tmp_path / "pipe.png")
    files = [small, deep, wide, tmp_path / "pipe.png"]
    done = run_limited(IMAGES, *map(str, files), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout)
    assert got["indices"] == [0, 1]  # one bad file never takes the batch down
    assert got["corners"][1] == [[200, 200, 200]] * 4
    (i2, e2), (i3, e3) = got["failed"]
    assert (i2, i3) == (2, 3)
    # the lower of hrnet's 100 MP and PIL's own limit (89.5 MP unless a library turned it off)
    assert re.fullmatch(re.escape(f"{wide}: refused: 12000x12000 pixels (144 MP) exceed the ") + r"(89|100)" +
                        re.escape(" MP limit (hrnet.data.decode.MAX_PIXELS, PIL's Image.MAX_IMAGE_PIXELS)"), e2)
    assert e3 == f"{tmp_path / 'pipe.png'}: not a regular file"

    values = np.array([[np.nan, np.inf, -np.inf, -5.0, 100.4, 100.6, 300.0]], dtype=np.float32)
    Image.fromarray(values, "F").save(tmp_path / "float.tif")
    assert np.asarray(load_image(tmp_path / "float.tif"))[0, :, 0].tolist() == [0, 255, 0, 0, 100, 101, 255]


def test_file_names_that_are_not_utf8_never_crash_text_output(tmp_path, checkpoint, capsys):
    # today: print() of the name raises UnicodeEncodeError (capsys, like a UTF-8 terminal, is strict)
    root = Path(os.fsdecode(bytes(tmp_path)))
    image(root / "a" / "0.png")
    image(root / "c" / "0.png")  # three class folders for the 3-class model (it has no names to match by)
    image(root / ODD / os.fsdecode(b"\xfe.png"), 50)
    (root / ODD / "bad.png").write_bytes(b"not a png")
    fast = ["--checkpoint", checkpoint, "--input-size", "32", "--workers", "0", "-q"]
    assert main(["predict", MODEL, str(root / ODD), "--topk", "1", *fast]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == f"{tmp_path}/odd\\xff/\\xfe.png" and "odd\\xff/bad.png: not an image" in err
    assert main(["eval", MODEL, "--data", str(root), "--per-class", *fast]) == 0
    out, err = capsys.readouterr()
    assert any(line.split()[:3] == ["2", "odd\\xff", "1"] for line in out.splitlines()), out
    assert main(["predict", MODEL, str(root / ODD), "--json", *fast]) == 0
    assert {r["file"] for r in json.loads(capsys.readouterr().out)} == {str(root / ODD / os.fsdecode(b"\xfe.png")),
                                                                          str(root / ODD / "bad.png")}


@pytest.mark.parametrize("argv", [["--topk", "0"], ["--batch-size", "0"], ["--workers", "-1"],
                                  ["--input-size", "0"], ["--crop-pct", "2"], ["--crop-pct", "nan"],
                                  ["--batch-size", "²"]])
def test_bad_predict_and_eval_numbers_are_one_line_errors(tmp_path, checkpoint, capsys, argv):
    # today: --topk 0, --batch-size 0 and --workers -1 end in a ValueError traceback after loading the model
    img = image(tmp_path / "a" / "0.png")
    for command in (["predict", MODEL, str(img)], ["eval", MODEL, "--data", str(tmp_path)]):
        if command[0] == "eval" and argv[0] == "--topk":
            continue
        with pytest.raises(SystemExit) as e:
            main([*command, "--checkpoint", checkpoint, "--input-size", "32", "-q", *argv])
        err = capsys.readouterr().err.splitlines()
        assert e.value.code == 2 and err[-1].startswith(f"hrnet {command[0]}: error: argument {argv[0]}: "), err


def test_crop_size_is_bounded_before_any_model_is_built():
    from argparse import ArgumentTypeError

    from hrnet.cli.predict import crop_size, worker_count

    assert crop_size("4096") == 4096 and worker_count("0") == 0
    with pytest.raises(ArgumentTypeError, match="from 1 to 4096"):
        crop_size("100000")  # a 114285-pixel resize: tens of GB per image
    with pytest.raises(ArgumentTypeError, match="from 0 to 256"):
        worker_count("100000")
