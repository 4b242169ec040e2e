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


@pytest.mark.slow
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


@pytest.mark.slow
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


NAMES = ("cat", "dog", "bird")
PADDLE_PYTHON = os.environ.get("HRNET_PADDLE_PYTHON", "/tmp/paddle-venv/bin/python")  # a venv with paddleclas


def _fine_tuned(tmp_path, size: int = 32):
    """A 3-class hrnet-w18-small file with names, evaluated at ``size`` px (as `hrnet train` writes one)."""
    import dataclasses
    model = randomize(create_model(SMALL, num_classes=3), seed=11)
    model.class_names = NAMES
    model.eval_cfg = dataclasses.replace(model.eval_cfg, input_size=size, resize_size=size * 8 // 7,
                                         interpolation="bicubic")
    hrnet.save_checkpoint(model, tmp_path / "best.safetensors")
    return model, tmp_path / "best.safetensors"


def test_convert_to_timm_hub_writes_timms_own_folder(tmp_path, capsys):
    model, src = _fine_tuned(tmp_path)
    out = tmp_path / "out"
    assert main(["convert", str(src), str(out), "--to", "timm", "--hub", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["class_names"] == list(NAMES)
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "hrnet_w18_small" and config["num_classes"] == 3
    assert config["label_names"] == list(NAMES)
    # real timm builds the 3-class classifier from the folder: same logits, names, transform
    reference = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert reference.num_classes == 3 and reference.pretrained_cfg["label_names"] == list(NAMES)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    assert (logits(reference, x) - logits(model, x)).abs().max() < 1e-4
    data = timm.data.resolve_data_config({}, model=reference)
    assert list(data["input_size"]) == [3, 32, 32] and data["interpolation"] == "bicubic"
    steps = timm.data.create_transform(**data).transforms
    assert steps[0].size == 36 and list(steps[1].size) == [32, 32]  # resize 36 (32 * 8 // 7), crop 32: hrnet's
    assert steps[0].interpolation.value == "bicubic"
    assert torch.allclose(steps[-1].mean, torch.tensor([0.485, 0.456, 0.406]))
    # hrnet reads the folder back, names included
    assert create_model(SMALL, checkpoint=out).class_names == NAMES


def test_convert_to_timm_without_hub_says_how_timm_loads_a_fine_tuned_head(tmp_path, capsys):
    model, src = _fine_tuned(tmp_path)
    assert main(["convert", str(src), str(tmp_path / "t.pth"), "--to", "timm"]) == 0
    out = capsys.readouterr().out
    assert "timm.create_model('hrnet_w18_small', num_classes=3)" in out and "--hub" in out
    reference = timm.create_model("hrnet_w18_small", num_classes=3)  # the recipe the line gives
    timm.models.load_checkpoint(reference, str(tmp_path / "t.pth"), strict=True)
    x = torch.randn(1, 3, 32, 32)
    assert (logits(reference, x) - logits(model, x)).abs().max() < 1e-4


def test_convert_to_paddle_reads_back_identical_and_refuses_anything_but_arrays(tmp_path, capsys):
    import pickle

    import numpy as np

    from hrnet.weights.containers import numpy_pickle
    model, src = _fine_tuned(tmp_path)
    dst = tmp_path / "best.pdparams"
    assert main(["convert", str(src), str(dst), "--to", "paddle", "-q"]) == 0
    raw = pickle.loads(dst.read_bytes())  # plain numpy arrays under PaddleClas's names, Linear [in, out]
    assert all(isinstance(v, np.ndarray) for v in raw.values()) and raw["fc.weight"].shape == (2048, 3)
    assert b"numpy._core" not in dst.read_bytes()  # numpy 1.x (Paddle's pin) reads it too
    sd, meta = load_checkpoint(dst)
    assert meta["format"] == "paddle" and meta["arch"] == "w18-small"
    want = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert all(torch.equal(sd[k], v) for k, v in want.items()) and set(want) <= set(sd)
    with pytest.raises(TypeError, match="numeric numpy arrays only"):
        numpy_pickle({"fc.weight": np.array([print], dtype=object)}, "x.pdparams")
    with pytest.raises(pickle.PicklingError, match="refused to pickle"):
        from hrnet.weights.containers import _NumpyOnlyPickler
        import io
        _NumpyOnlyPickler(io.BytesIO(), protocol=4).dump({"a": print})
    assert main(["convert", str(src), str(tmp_path / "p.pth"), "--to", "paddle"]) == 1
    assert "name it p.pdparams" in capsys.readouterr().err


@pytest.mark.slow
def test_paddleclas_loads_the_pdparams_with_the_same_logits(tmp_path):
    import subprocess

    import numpy as np
    if not os.path.exists(PADDLE_PYTHON) or subprocess.run([PADDLE_PYTHON, "-c", "import paddle, paddleclas"],
                                                           capture_output=True).returncode:
        pytest.skip(f"PaddleClas not installed ({PADDLE_PYTHON}; set HRNET_PADDLE_PYTHON to a venv with "
                    "paddlepaddle and paddleclas)")
    model = randomize(create_model("w18", num_classes=3), seed=12)
    with torch.no_grad():  # logits of O(1), where 1e-4 is a real bound (float32 noise at 300 is 3e-4)
        model.classifier.weight.mul_(0.01)
    hrnet.save_checkpoint(model, tmp_path / "m.safetensors")
    convert_out = tmp_path / "m.pdparams"
    assert main(["convert", str(tmp_path / "m.safetensors"), str(convert_out), "--to", "paddle", "-q"]) == 0
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    np.save(tmp_path / "x.npy", x.numpy())
    code = ("import sys, numpy as np, paddle\n"
            "from paddleclas.ppcls.arch.backbone.legendary_models.hrnet import HRNet_W18_C\n"
            "from paddleclas.ppcls.utils.save_load import load_dygraph_pretrain\n"
            "m = HRNet_W18_C(class_num=3); load_dygraph_pretrain(m, sys.argv[1]); m.eval()\n"
            "np.save(sys.argv[3], m(paddle.to_tensor(np.load(sys.argv[2]))).numpy())\n")
    subprocess.run([PADDLE_PYTHON, "-c", code, str(convert_out), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
                   check=True, capture_output=True, timeout=300, cwd=tmp_path)
    got = torch.from_numpy(np.load(tmp_path / "y.npy"))
    assert (got - logits(model, x)).abs().max() < 1e-4
