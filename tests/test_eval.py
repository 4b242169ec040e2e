"""hrnet eval end to end: labels chosen from the model's independently computed ranking, so top-1
and top-5 are known in advance; bad files skipped; torchrun on 2 processes gives the same counts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hrnet import create_model
from hrnet.cli import main
from hrnet.data import imagenet_names, imagenet_wnids
from hrnet.inference.evaluate import evaluate
from hrnet.inference.predict import predict
from hrnet.weights import save_checkpoint
from helpers import stop_rank_and_expect_one_line, torchrun_argv, worker_pid
from test_data import make_bad_corpus
from test_predict import CROP, FAST, MODEL, model_and_photos

# For photo i, the label is the class the model ranks at RANKS[i]: rank 0 hits top-1, 1-4 top-5 only.
RANKS = [0, 2, 40, 0, 3, 0, 40]
TOP1, TOP5 = 100 * 3 / 7, 100 * 5 / 7


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    model, ckpt, photos, logits = model_and_photos(d)
    labels = []
    for row, rank in zip(logits, RANKS):
        order = row.argsort(descending=True)
        label = int(order[rank])
        # the label must sit clearly on its side of the top-1 and top-5 boundaries (no float near-ties)
        top1_margin = row[label] - row[order[1]] if rank == 0 else row[order[0]] - row[label]
        top5_margin = row[label] - row[order[5]] if rank < 5 else row[order[4]] - row[label]
        assert min(top1_margin, top5_margin) > 1e-3, "near-tied logits: the chosen labels would not be robust"
        labels.append(label)
    root = d / "imagenet"
    for p, label in zip(photos, labels):
        (root / imagenet_wnids()[label]).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, root / imagenet_wnids()[label] / p.name)
    return model, ckpt, photos, labels, root


def run_eval(*argv: str, capsys) -> dict:
    assert main(["eval", MODEL, *argv, "--json", *FAST]) == 0
    return json.loads(capsys.readouterr().out)


def test_imagenet_folders_give_the_known_top1_top5(setup, capsys):
    _, ckpt, _, _, root = setup
    r = run_eval("--checkpoint", str(ckpt), "--data", str(root), capsys=capsys)
    assert (r["n"], r["skipped"]) == (7, [])
    assert r["top1"] == pytest.approx(TOP1) and r["top5"] == pytest.approx(TOP5)
    assert r["images_per_s"] > 0


def test_annotation_file_and_per_class(setup, tmp_path, capsys):
    _, ckpt, photos, labels, _ = setup
    ann = tmp_path / "val.txt"
    ann.write_text("".join(f"photos/{p.name} {label}\n" for p, label in zip(photos, labels)))
    r = run_eval("--checkpoint", str(ckpt), "--data", str(photos[0].parent.parent), "--ann-file", str(ann),
                 "--per-class", capsys=capsys)
    assert r["top1"] == pytest.approx(TOP1) and r["top5"] == pytest.approx(TOP5) and r["n"] == 7
    expected: dict[int, list[int]] = {}
    for label, rank in zip(labels, RANKS):
        expected.setdefault(label, []).append(rank)
    assert [c["index"] for c in r["per_class"]] == sorted(expected)
    for c in r["per_class"]:
        ranks = expected[c["index"]]
        assert c["label"] == imagenet_names()[c["index"]] and c["n"] == len(ranks)
        assert c["top1"] == pytest.approx(100 * sum(k == 0 for k in ranks) / len(ranks))
        assert c["top5"] == pytest.approx(100 * sum(k < 5 for k in ranks) / len(ranks))


def test_bad_files_are_skipped_listed_and_excluded(setup, tmp_path, capsys):
    model, ckpt, photos, labels, root = setup
    data = tmp_path / "val"
    shutil.copytree(root, data)
    good, bad = make_bad_corpus(tmp_path / "corpus")
    # the decodable corpus files get the label the model predicts for them: all top-1 hits
    preds = predict(model, [tmp_path / "corpus" / g for g in good], topk=1, input_size=CROP, workers=0)
    for rec in preds:
        wnid = imagenet_wnids()[rec["topk"][0]["index"]]
        (data / wnid).mkdir(exist_ok=True)
        shutil.copy(rec["file"], data / wnid / os.path.basename(rec["file"]))
    for b in bad:
        shutil.copy(tmp_path / "corpus" / b, data / imagenet_wnids()[labels[0]] / b)
    (data / imagenet_wnids()[labels[0]] / "README.txt").write_text("not an image extension: not a sample")
    r = run_eval("--checkpoint", str(ckpt), "--data", str(data), "--workers", "1", capsys=capsys)
    n = 7 + len(good)
    assert r["n"] == n
    assert r["top1"] == pytest.approx(100 * (3 + len(good)) / n)
    assert r["top5"] == pytest.approx(100 * (5 + len(good)) / n)
    assert sorted(os.path.basename(s["file"]) for s in r["skipped"]) == sorted(bad)
    for s in r["skipped"]:
        assert s["error"].startswith(s["file"] + ": ") and "\n" not in s["error"]

    code = main(["eval", MODEL, "--checkpoint", str(ckpt), "--data", str(data), "--strict", *FAST])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and err.startswith("hrnet: error: ") and str(data) in err


def test_python_api_with_a_model_object_and_another_backend(setup):
    model, _, _, _, root = setup
    r = evaluate(model, root, input_size=CROP, workers=0, backend="fused")
    assert (r["top1"], r["top5"], r["n"]) == (pytest.approx(TOP1), pytest.approx(TOP5), 7)


def test_labels_beyond_the_model_are_a_clear_error(setup, tmp_path, capsys):
    _, ckpt, photos, _, _ = setup
    ann = tmp_path / "val.txt"
    ann.write_text(f"{photos[0].name} 1000\n")
    assert main(["eval", MODEL, "--checkpoint", str(ckpt), "--data", str(photos[0].parent),
                 "--ann-file", str(ann), *FAST]) == 1
    assert "label 1000" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_on_an_odd_count(setup, tmp_path, capsys):
    _, ckpt, _, labels, root = setup
    data = tmp_path / "val"
    shutil.copytree(root, data)
    (data / imagenet_wnids()[labels[1]] / "zero.jpg").write_bytes(b"")  # 8 files: 7 images, 1 skipped
    argv = ["eval", MODEL, "--checkpoint", str(ckpt), "--data", str(data), "--json", *FAST]
    single = run_eval(*argv[2:-len(FAST) - 1], capsys=capsys)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(torchrun_argv("-m", "hrnet", *argv), capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dist = json.loads(proc.stdout)
    for key in ("top1", "top5", "n", "skipped"):
        assert dist[key] == single[key], key
    assert (dist["n"], len(dist["skipped"])) == (7, 1)
    assert torch.distributed.is_available()


@pytest.mark.slow
def test_a_folder_of_empty_files_says_how_many_were_found_and_empty(tmp_path, capsys):
    """Issue 22: a folder of empty files said only "no image could be evaluated"."""
    model = create_model("w18-small", num_classes=2)  # two class folders, no names
    ckpt = save_checkpoint(model, tmp_path / "w.safetensors")
    for c in ("a", "b"):
        (tmp_path / "val" / c).mkdir(parents=True)
        for i in range(1000):
            (tmp_path / "val" / c / f"{i}.jpg").touch()
    (tmp_path / "val" / "a" / "junk.jpg").write_bytes(b"not an image")
    assert main(["eval", "hrnet-w18-small", "--checkpoint", str(ckpt), "--data", str(tmp_path / "val"),
                 "--input-size", "64", "--workers", "0", "-q"]) == 1
    last = capsys.readouterr().err.splitlines()[-1]
    assert last == "hrnet: error: no image could be evaluated: 2001 files found, 2000 empty, 1 unreadable"


def _open_under(pid: int, root: Path) -> bool:
    """Whether process ``pid`` has a file under ``root`` open now."""
    try:
        return any(os.readlink(fd).startswith(str(root)) for fd in Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False


@pytest.mark.slow
def test_a_stopped_rank_ends_a_torchrun_eval_within_the_timeout(setup, tmp_path):
    """Issue 18: a SIGSTOPped rank, stopped while it decodes its share, ends a 2-process eval within
    the collective timeout, in one line naming it, instead of PyTorch's 30 minutes."""
    data = tmp_path / "val" / imagenet_wnids()[7]
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(40):  # large enough that decoding one keeps it open for milliseconds
        Image.fromarray(rng.integers(0, 256, (900, 1200, 3), dtype=np.uint8)).save(data / f"{i:02d}.jpg", quality=90)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path),
           "HRNET_COLLECTIVE_TIMEOUT_S": "5"}
    proc = subprocess.Popen(torchrun_argv("-m", "hrnet", "eval", MODEL, "--checkpoint", str(setup[1]), "--data",
                                          str(tmp_path / "val"), "--batch-size", "1", *FAST),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    rank1 = None
    while rank1 is None or not _open_under(rank1, data):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        try:
            rank1 = rank1 or worker_pid(proc.pid, 1)
        except AssertionError:  # not started yet
            time.sleep(0.05)
        time.sleep(0.002)
    stop_rank_and_expect_one_line(proc, 1, timeout_s=5)
