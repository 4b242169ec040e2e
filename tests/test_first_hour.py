"""What a new user meets first: `hrnet data digits`, the offline demo, extras named before work starts,
--version, usage errors, pipes, and one --quiet rule for every command."""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import importlib.metadata
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

import hrnet
from hrnet.cli import build_parser, main
from hrnet.data.digits import write_digits
from hrnet.extras import MissingExtraError, require

ROOT = Path(__file__).resolve().parent.parent
SRC_ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pngs(folder: Path) -> dict[str, list[str]]:
    return {d.name: sorted(p.name for p in d.glob("*.png")) for d in sorted(folder.iterdir())}


# --- hrnet data digits ----------------------------------------------------------------------------

def test_digits_tree_holds_every_scan_once_with_a_stratified_split(tmp_path):
    digits = load_digits()
    train, val = write_digits(tmp_path / "d", size=8)
    tr, va = pngs(train), pngs(val)
    assert sorted(tr) == sorted(va) == [str(d) for d in range(10)]
    for d in range(10):
        n = int((digits.target == d).sum())
        assert len(va[str(d)]) == round(0.2 * n) and len(tr[str(d)]) + len(va[str(d)]) == n
        idx = [int(f[:-4]) for f in tr[str(d)] + va[str(d)]]
        assert sorted(set(idx)) == sorted(idx) and all(digits.target[i] == d for i in idx)
    # size 8 keeps the scan's own pixels: 0..16 grey levels scaled to 0..255
    i = int(va["7"][0][:-4])
    img = Image.open(val / "7" / va["7"][0])
    assert img.mode == "L" and img.size == (8, 8)
    np.testing.assert_array_equal(np.asarray(img), np.round(digits.images[i] * 255 / 16).astype(np.uint8))


def test_digits_split_is_fixed_by_the_seed(tmp_path):
    a = pngs(write_digits(tmp_path / "a", per_class=20)[1])
    b = pngs(write_digits(tmp_path / "b", per_class=20)[1])
    c = pngs(write_digits(tmp_path / "c", per_class=20, seed=1)[1])
    assert a == b and a != c and sum(map(len, a.values())) == 40
    assert Image.open(next((tmp_path / "a" / "train" / "3").glob("*.png"))).size == (32, 32)


def test_data_refuses_a_non_empty_folder_in_one_line_and_fills_an_empty_one(tmp_path, capfd):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert main(["data", "digits", str(tmp_path / "full")]) == 1
    err = capfd.readouterr().err
    assert err.startswith("hrnet: error: ") and "full" in err and err.count("\n") == 1
    assert os.listdir(tmp_path / "full") == ["keep.txt"]
    assert sorted(os.listdir(tmp_path)) == ["full"]  # no temporary folder left behind

    (tmp_path / "empty").mkdir()
    assert main(["data", "digits", str(tmp_path / "empty"), "--per-class", "5", "--val-fraction", "0.4"]) == 0
    assert "wrote 30 training images" in capfd.readouterr().out
    assert sum(map(len, pngs(tmp_path / "empty" / "val").values())) == 20


# --- optional dependencies named before work starts ---------------------------------------------

@pytest.mark.parametrize("argv, extra", [
    (["export", "hrnet-w18-small", "-o", "{tmp}/m.onnx"], "onnx"),
    (["bench", "hrnet-w18-small", "--backend", "eager", "onnxruntime"], "onnx"),
    (["data", "digits", "{tmp}/d"], "digits"),
])
def test_a_missing_extra_is_named_before_any_work(tmp_path, capfd, monkeypatch, argv, extra):
    blocked = {"onnx": "onnxscript", "digits": "sklearn"}[extra]
    monkeypatch.setitem(sys.modules, blocked, None)  # import of it raises ImportError
    assert main([a.format(tmp=tmp_path) for a in argv]) == 1
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and blocked in err and f"pip install 'hrnet[{extra}]'" in err
    assert os.listdir(tmp_path) == []
    with pytest.raises(MissingExtraError):
        require(extra, "test")


# --- top-level behaviour ------------------------------------------------------------------------

def test_version_is_the_package_version(capsys):
    want = importlib.metadata.version("hrnet")  # what pip installed, from pyproject's version attribute
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"hrnet {want}\n"


def test_an_extra_argument_gets_the_commands_usage_not_the_top_level_one(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "hrnet-w18-small", "--batch-size", "1", "4"])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.startswith("usage: hrnet bench ") and "hrnet bench: error: unrecognized arguments: 4" in err


@pytest.mark.slow
def test_a_closed_pipe_ends_quietly():
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line is written, as with `| head -0`
    proc = subprocess.run([sys.executable, "-m", "hrnet", "list"], stdout=write, stderr=subprocess.PIPE,
                          text=True, env=SRC_ENV, timeout=120)
    os.close(write)
    assert proc.returncode == 141 and proc.stderr == ""


# --- one --quiet rule for every command ---------------------------------------------------------

@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A tiny digits tree, a 10-class hrnet-w18-small checkpoint and a one-step training run."""
    from hrnet.training.config import load_config
    from hrnet.training.train import train

    tmp = tmp_path_factory.mktemp("quiet")
    train_dir, val_dir = write_digits(tmp / "digits", per_class=3)
    ckpt = tmp / "w.safetensors"
    torch.manual_seed(0)
    hrnet.save_checkpoint(hrnet.create_model("hrnet-w18-small", num_classes=10), ckpt)
    run = train(load_config("digits",
                            [f"data.train={train_dir}", f"data.val={val_dir}", "schedule.epochs=1", "data.batch_size=8",
                             f"output.dir={tmp / 'run'}"]), quiet=True)
    image = next((val_dir / "5").glob("*.png"))
    return {"tmp": tmp, "train": train_dir, "val": val_dir, "ckpt": ckpt, "run": run.run_dir, "image": image}


W = ["hrnet-w18-small", "--checkpoint", "{ckpt}"]
QUIET_CASES = {
    "list": ["list"],
    "info": ["info", "hrnet_w18"],
    "flops": ["flops", "hrnet-w18-small", "--input-size", "32", "32"],
    "data": ["data", "digits", "{tmp}/d2", "--per-class", "2"],
    "bench": ["bench", "hrnet-w18-small", "--backend", "eager", "--input-size", "32", "32", "--iters", "1"],
    "export": ["export", *W, "-o", "{tmp}/m.onnx", "--input-size", "32", "32"],
    "cam": ["cam", *W, "{image}", "--input-size", "32", "-o", "{tmp}/cam.png"],
    "predict": ["predict", *W, "{image}", "--input-size", "32"],
    "eval": ["eval", *W, "--data", "{val}", "--input-size", "32"],
    "convert": ["convert", "{ckpt}", "{tmp}/converted.safetensors"],
    "train": ["train", "digits", "--set", "data.train={train}", "--set",
              "data.val={val}", "--set", "schedule.epochs=1", "--set", "data.batch_size=8", "--set",
              "output.dir={tmp}/run2"],
    "plot": ["plot", "{run}", "-o", "{tmp}/curves.png"],
    "recipes": ["recipes"],
    "quantize": ["quantize", *W, "--calib", "{val}", "--num-images", "4", "--input-size", "32", "-o",
                 "{tmp}/m.int8.onnx"],
    "compare": ["compare", *W, "--data", "{val}", "--input-size", "32", "eager", "fused"],
}
# serve runs until it is signalled: tests/test_serve.py starts it with -q and reads its output.
LONG_RUNNING = {"serve", "optimize"}  # a server; minutes of timing candidates (tests/test_optimize.py runs it)


def test_the_quiet_cases_cover_every_command():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(QUIET_CASES) | LONG_RUNNING == set(sub.choices)


@pytest.mark.parametrize("command", sorted(QUIET_CASES))
@pytest.mark.slow
def test_quiet_through_a_pipe_prints_the_result_and_nothing_else(command, small, capfd):
    argv = [a.format(**small) for a in QUIET_CASES[command]] + ["--quiet"]
    code = main(argv)
    out, err = capfd.readouterr()  # both are pipes here, not terminals
    assert code == 0, err
    assert out.strip(), "a result is printed under --quiet"
    assert err == "", "no chatter and no progress bar on stderr"
    assert "\r" not in out


# --- the demo -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_demo_runs_offline_and_its_summary_is_true(tmp_path):
    env = {**SRC_ENV, "HRNET_DEMO_DIR": str(tmp_path), "HRNET_HOME": str(tmp_path / "home"),
           "HRNET_MIRROR": f"http://127.0.0.1:{closed_port()}", "HRNET_DEMO_EPOCHS": "1",
           "HRNET_DEMO_PER_CLASS": "12", "HRNET_DEMO_IMAGES": "3", "HRNET_DEMO_BENCH_ITERS": "2"}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "demo.py")], env=env, capture_output=True,
                          text=True, timeout=600)
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"^skipped: hrnet-w18's weights cannot be downloaded .*127\.0\.0\.1", out, re.M)
    assert out.count("(true label: ") == 3

    # every command is shown before it runs, and every file the summary names exists
    shown = re.findall(r"^\$ hrnet (\w+)", out, re.M)
    assert shown == ["data", "train", "plot", "eval", "predict", "cam", "export", "bench"]
    files = out.split("\nfiles:\n", 1)[1].splitlines()
    assert len(files) == 6
    for line in files:
        assert (tmp_path / line.split()[0]).exists(), line

    # the accuracy it reports is hrnet eval's, and an independent count over the held-out folder
    printed = float(re.search(r"^held-out accuracy \(hrnet eval\): ([\d.]+) % top-1", out, re.M).group(1))
    weights, val = tmp_path / "runs" / "digits" / "best.safetensors", tmp_path / "digits" / "val"
    assert printed == round(hrnet.evaluate("hrnet-w18-small", val, checkpoint=weights)["top1"], 2)
    model = hrnet.create_model("hrnet-w18-small", checkpoint=weights).eval()
    files = sorted(val.glob("*/*.png"))
    resize = int(32 / 0.875)  # the zoo record's crop_pct, 224/256
    crop = round((resize - 32) / 2)
    mean, std = torch.tensor([123.675, 116.28, 103.53]), torch.tensor([58.395, 57.12, 57.375])
    crops = [Image.open(f).convert("RGB").resize((resize, resize), Image.BILINEAR).crop((crop, crop, crop + 32, crop + 32))
             for f in files]
    x = torch.stack([torch.from_numpy(np.asarray(c, dtype=np.float32)) for c in crops])
    with torch.no_grad():
        pred = model(((x - mean) / std).permute(0, 3, 1, 2)).argmax(1)
    labels = torch.tensor([int(f.parent.name) for f in files])
    assert printed == round(100 * (pred == labels).float().mean().item(), 2)
    speeds = re.search(r"^images/s at batch 16, 32x32 \(hrnet bench\): eager ([\d.]+), onnxruntime ([\d.]+)$",
                       out, re.M)
    assert speeds and all(float(s) > 0 for s in speeds.groups())


def test_cam_of_a_class_outside_the_top5_shows_its_score_and_rank(small, capsys, tmp_path):
    args = ["hrnet-w18-small", "--checkpoint", str(small["ckpt"]), "--input-size", "32"]
    assert main(["predict", *args, str(small["image"]), "--topk", "10", "--json"]) == 0
    ranked = json.loads(capsys.readouterr().out)[0]["topk"]  # all 10 classes, best first
    last = ranked[-1]
    assert main(["cam", *args, str(small["image"]), "--class", str(last["index"]), "-o", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    assert f"({last['index']}, {100 * last['score']:.1f}%, rank 10)" in out
