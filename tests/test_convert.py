"""hrnet convert: checkpoint -> hrnet's format -> identical logits; --hub directories; clear refusals."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import timm
import torch
from helpers import randomize
from test_weights import assert_logits_close, logits, to_mmcls

import hrnet
from hrnet.cli import main
from hrnet import create_model
from hrnet.weights import load_checkpoint

SMALL = "hrnet-w18-small"


@pytest.fixture(scope="module")
def reference():
    return randomize(timm.create_model("hrnet_w18_small", pretrained=False, num_classes=5), seed=4)


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))


def test_convert_official_then_load_gives_identical_logits(tmp_path, x, reference, capsys):
    src, dst = tmp_path / "official.pth", tmp_path / "converted.safetensors"
    torch.save({"state_dict": reference.state_dict()}, src)
    assert main(["convert", str(src), str(dst), "--quiet"]) == 0
    assert str(dst) in capsys.readouterr().out
    converted = logits(create_model(SMALL, num_classes=5, checkpoint=dst), x)
    assert torch.equal(converted, logits(create_model(SMALL, num_classes=5, checkpoint=src), x))
    assert_logits_close(converted, logits(reference, x))
    _, meta = load_checkpoint(dst)
    assert meta["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert (meta["model"], meta["arch"], meta["num_classes"], meta["source_format"]) == (SMALL, "w18-small", "5", "official")


def test_convert_hub_directory_loads_with_create_model(tmp_path, x, capsys):
    mm = randomize(timm.create_model("hrnet_w18_small", pretrained=False, head_conv_bias=False), seed=6)
    src, dst = tmp_path / "mmcls.pth", tmp_path / "hub"
    torch.save({"meta": {}, "state_dict": to_mmcls(mm.state_dict())}, src)
    assert main(["convert", str(src), str(dst), "--hub", "--json", "--model", "hrnet_w18_small"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["dst"] == str(dst / "model.safetensors") and result["source_format"] == "mmcls"
    assert json.loads((dst / "config.json").read_text())["model"] == SMALL
    assert_logits_close(logits(create_model(SMALL, checkpoint=dst), x), logits(mm, x))


@pytest.mark.parametrize("extra, message", [
    (["--model", "hrnet-w18-small-v2"], "holds w18-small weights (hrnet-w18-small), but the model is hrnet-w18-small-v2"),
    (["--from", "paddle"], "is a checkpoint in the official layout, not paddle"),
])
def test_convert_refuses_a_wrong_model_or_layout(tmp_path, reference, capsys, extra, message):
    src = tmp_path / "official.pth"
    torch.save(reference.state_dict(), src)
    assert main(["convert", str(src), str(tmp_path / "out.safetensors"), *extra]) == 1
    err = capsys.readouterr().err
    assert err.startswith("hrnet: error: ") and message in err
    assert not (tmp_path / "out.safetensors").exists()


def test_convert_refuses_to_overwrite_its_own_input_by_any_name(tmp_path, capsys, monkeypatch):
    # issue 22 §1: `convert c.safetensors c.safetensors --to timm` replaced the input with a torch zip (exit 0)
    src = tmp_path / "c.safetensors"
    hrnet.save_checkpoint(randomize(create_model(SMALL), seed=8), src)
    before = src.read_bytes()
    (tmp_path / "link.safetensors").symlink_to(src)
    os.link(src, tmp_path / "hard.safetensors")
    monkeypatch.chdir(tmp_path)
    for dst in (str(src), "link.safetensors", "hard.safetensors", "./c.safetensors"):
        assert main(["convert", "c.safetensors", dst, "--to", "timm"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is the same file as the input c.safetensors" in err, err
    assert src.read_bytes() == before


def test_readers_pick_the_container_from_the_bytes_and_writers_never_misname_one(tmp_path, x, capsys):
    model = randomize(create_model(SMALL), seed=9)
    torch.save(model.state_dict(), tmp_path / "zip.safetensors")  # a torch zip under a safetensors name
    hrnet.save_checkpoint(model, tmp_path / "st.safetensors")
    (tmp_path / "st.safetensors").rename(tmp_path / "st.pth")  # safetensors under a torch name
    for name in ("zip.safetensors", "st.pth"):
        assert torch.equal(logits(create_model(SMALL, checkpoint=tmp_path / name), x), logits(model, x))
    # timm's layout under a .safetensors name is safetensors (timm reads both); timm loads it strictly
    assert main(["convert", str(tmp_path / "st.pth"), str(tmp_path / "timm.safetensors"), "--to", "timm", "-q"]) == 0
    assert (tmp_path / "timm.safetensors").read_bytes()[8:9] == b"{"
    reference = timm.create_model("hrnet_w18_small", pretrained=False)
    timm.models.load_checkpoint(reference, str(tmp_path / "timm.safetensors"), strict=True)
    assert_logits_close(logits(reference, x), logits(model, x))
    # no container under another's name: one line saying which name to use
    for args, message in ((["mm.safetensors", "--to", "mmcls"], "the mmcls layout is a torch file"),
                          (["w.pth"], "hrnet's format is a safetensors file, not torch as the name says; name it w.safetensors"),
                          (["w.onnx", "--to", "official"], "not onnx as the name says; name it w.pth")):
        assert main(["convert", str(tmp_path / "st.pth"), str(tmp_path / args[0]), *args[1:]]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
        assert not (tmp_path / args[0]).exists()
