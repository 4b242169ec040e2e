"""hrnet predict end to end: known rankings from an independent forward pass, and bad inputs.

The helpers here (random checkpoint, independent reference logits) are shared with test_eval.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hrnet.cli import main
from hrnet.data import imagenet_names
from hrnet.inference.predict import predict
from hrnet import create_model
from hrnet.weights import save_checkpoint
from test_data import make_bad_corpus
from test_transforms import PHOTOS, mmcls_reference

MODEL = "hrnet-w18-small"
CROP, SHORT = 64, 73  # --input-size 64 with the record's crop_pct 0.875: short edge floor(64 / 0.875)
FAST = ["--input-size", str(CROP), "--workers", "0", "-q"]
SIZES = [(500, 375), (375, 500), (257, 300), (96, 80), (80, 96), (300, 257), (120, 90)]


def random_model(photos: list[Path]) -> torch.nn.Module:
    """Random weights, non-trivial BatchNorm statistics, and a classifier bias that centres the
    pooled features of ``photos``, so that each photo ranks the classes differently."""
    torch.manual_seed(0)
    model = create_model(MODEL)
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    model.eval()
    with torch.inference_mode():
        x = torch.stack([torch.from_numpy(mmcls_reference(Image.open(f), SHORT, CROP)).float() for f in photos])
        mu = model.forward_head(model.forward_features(x), pre_logits=True).mean(0)
        model.classifier.bias.copy_(-model.classifier.weight @ mu)
    return model


def write_photos(d: Path) -> list[Path]:
    """Real photos at odd sizes, as JPEG and PNG."""
    d.mkdir(parents=True, exist_ok=True)
    out = []
    for i, size in enumerate(SIZES):
        img = Image.open(PHOTOS[i % len(PHOTOS)]).convert("RGB").resize(size, Image.LANCZOS)
        path = d / f"photo{i}.{'jpg' if i % 2 else 'png'}"
        img.save(path, quality=90)
        out.append(path)
    return out


def reference_logits(model: torch.nn.Module, files: list[Path]) -> torch.Tensor:
    """The model on the test's own decoding and mmcls preprocessing, one image at a time."""
    with torch.inference_mode():
        x = [torch.from_numpy(mmcls_reference(Image.open(f).convert("RGB"), SHORT, CROP)).float() for f in files]
        return torch.cat([model(t[None]) for t in x])


def model_and_photos(d: Path) -> tuple[torch.nn.Module, Path, list[Path], torch.Tensor]:
    """Photos in ``d/photos``, a random model saved to ``d/random.safetensors``, its reference logits."""
    photos = write_photos(d / "photos")
    model = random_model(photos)
    return model, save_checkpoint(model, d / "random.safetensors"), photos, reference_logits(model, photos)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return model_and_photos(tmp_path_factory.mktemp("predict"))


def test_predict_cli_json_matches_independent_ranking(setup, capsys):
    model, ckpt, photos, logits = setup
    assert main(["predict", MODEL, "--checkpoint", str(ckpt), str(photos[0].parent), "--json", *FAST]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["file"] for r in records] == sorted(str(p) for p in photos)
    probs = logits.softmax(1)
    assert len({int(i) for i in logits.argmax(1)}) > 1, "degenerate model: every photo ranks the same"
    for r in records:
        i = photos.index(Path(r["file"]))
        expected = probs[i].topk(5)
        assert [t["index"] for t in r["topk"]] == expected.indices.tolist()
        assert [t["label"] for t in r["topk"]] == [imagenet_names()[j] for j in expected.indices]
        np.testing.assert_allclose([t["score"] for t in r["topk"]], expected.values, rtol=1e-4, atol=1e-6)


def test_predict_api_takes_a_model_and_globs(setup):
    model, _, photos, logits = setup
    records = predict(model, [str(photos[0].parent / "*.jpg"), photos[0]], topk=1, input_size=CROP, workers=1)
    jpgs = sorted(str(p) for p in photos if p.suffix == ".jpg")
    assert [r["file"] for r in records] == [*jpgs, str(photos[0])]
    for r in records:
        assert r["topk"][0]["index"] == int(logits[photos.index(Path(r["file"]))].argmax())


def test_predict_bad_inputs_are_reported_and_the_rest_classified(setup, tmp_path, capsys):
    _, ckpt, photos, _ = setup
    good, bad = make_bad_corpus(tmp_path / "corpus")
    argv = ["predict", MODEL, "--checkpoint", str(ckpt), str(tmp_path / "corpus"), str(photos[1]),
            str(tmp_path / "missing.jpg"), "--json", *FAST]
    assert main(argv) == 0
    out = capsys.readouterr()
    records = {os.path.basename(r["file"]): r for r in json.loads(out.out)}
    assert set(records) == {*good, *bad, photos[1].name, "missing.jpg"}
    for name in [*good, photos[1].name]:
        assert len(records[name]["topk"]) == 5, records[name]
    for name in [*bad, "missing.jpg"]:
        assert name in records[name]["error"] and "\n" not in records[name]["error"]
        assert "topk" not in records[name]
    assert len(out.err.strip().splitlines()) == len(bad) + 1  # one stderr line per skipped input


def test_predict_fails_only_when_nothing_was_classified(setup, tmp_path, capsys):
    _, ckpt, _, _ = setup
    _, bad = make_bad_corpus(tmp_path)
    assert main(["predict", MODEL, "--checkpoint", str(ckpt), *(str(tmp_path / b) for b in bad), *FAST]) == 1
    assert "no input could be classified" in capsys.readouterr().err


def test_predict_strict_stops_with_one_line(setup, tmp_path, capsys):
    _, ckpt, photos, _ = setup
    (tmp_path / "zero.jpg").write_bytes(b"")
    code = main(["predict", MODEL, "--checkpoint", str(ckpt), str(photos[0]), str(tmp_path / "zero.jpg"),
                 "--strict", *FAST])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "zero.jpg: empty file" in err


def test_predict_text_output(setup, capsys):
    _, ckpt, photos, logits = setup
    assert main(["predict", MODEL, "--checkpoint", str(ckpt), str(photos[2]), "--topk", "2", *FAST]) == 0
    lines = capsys.readouterr().out.splitlines()
    top = int(logits[2].argmax())
    assert lines[0] == str(photos[2]) and len(lines) == 3
    assert lines[1].startswith("  1.") and lines[1].endswith(f"{imagenet_names()[top]} ({top})")


def test_predict_through_the_fused_backend_keeps_the_ranking(setup):
    model, _, photos, logits = setup
    records = predict(model, photos, topk=3, input_size=CROP, workers=0, backend="fused")
    for r, row in zip(records, logits):
        assert [t["index"] for t in r["topk"]] == row.topk(3).indices.tolist()


def test_a_huge_batch_size_is_capped_at_the_number_of_inputs(setup, monkeypatch):
    """Issue 22: --batch-size 100000 on a few images grew memory without bound."""
    import hrnet.deploy.engine as engine

    _, ckpt, photos, _ = setup
    sizes = []
    loader = engine.inference_loader
    monkeypatch.setattr(engine, "inference_loader", lambda ds, bs, *a, **k: sizes.append(bs) or loader(ds, bs, *a, **k))
    records = predict(MODEL, photos, checkpoint=ckpt, input_size=CROP, workers=0, batch_size=100000)
    assert sizes == [len(photos)] and all("topk" in r for r in records)


def test_a_batch_the_machine_cannot_hold_is_refused_with_an_estimate(setup, monkeypatch, capsys):
    import hrnet.deploy.engine as engine

    _, ckpt, photos, _ = setup
    with open("/proc/meminfo") as f:  # the reader agrees with the kernel's own table
        kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    assert abs(engine.available_memory("cpu") - kib * 1024) < 2**30
    monkeypatch.setattr(engine, "available_memory", lambda device: 2 * 2**20)  # 2 MiB free
    assert main(["predict", MODEL, "--checkpoint", str(ckpt), *map(str, photos), *FAST, "--batch-size", "100000"]) == 1
    err = capsys.readouterr().err
    # 7 images (the cap, not 100000) at 64 px: the stem's 64 x 32 x 32 float32 output, 4 alive at once, plus
    # 5 queued 3 x 64 x 64 float32 inputs per image: 7 x (1 MiB + 240 KiB) = 8.6 MiB, printed rounded
    assert err == (f"hrnet: error: --batch-size {len(photos)}: a batch of {len(photos)} images at {CROP}x{CROP} "
                   "needs about 9 MiB, and cpu has 2 MiB available; choose a smaller --batch-size\n"), err
