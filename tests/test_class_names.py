"""Class names are part of the model: the one naming rule, names through hrnet's file, hub directory and
mmcls meta, the zoo's ImageNet names, and hostile names refused in one line."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from helpers import randomize
from safetensors.torch import load_file, save_file
from safetensors import safe_open

import hrnet
from hrnet import create_model, save_checkpoint
from hrnet.cli import main
from hrnet.data import class_names
from hrnet.weights import CheckpointError, convert_checkpoint, load_checkpoint

NAMES = ("cat", "dog", "bird")


def three_class_model(seed: int = 3):
    model = randomize(create_model("w18-small", num_classes=3), seed=seed)
    model.class_names = NAMES
    return model


def test_zoo_model_names_are_imagenets_and_a_model_without_names_gives_indices():
    info = timm.data.ImageNetInfo()  # timm's own table, independent of hrnet's copy
    zoo = create_model("hrnet-w18-small")
    assert zoo.class_names == tuple(info.index_to_description(i) for i in range(1000))
    assert class_names(zoo) == list(zoo.class_names)
    bare = create_model("w18-small", num_classes=3)
    assert bare.class_names is None and class_names(bare) == ["0", "1", "2"]
    assert class_names(1000)[0] == info.index_to_description(0) and class_names(2) == ["0", "1"]
    zoo.reset_classifier(3)  # a new head: its classes have no names yet
    assert zoo.class_names is None and class_names(zoo) == ["0", "1", "2"]
    zoo.reset_classifier(3, NAMES)
    assert class_names(zoo) == list(NAMES)
    with pytest.raises(ValueError, match="2 class names for 3 classes"):
        zoo.reset_classifier(3, NAMES[:2])


@pytest.mark.slow
def test_names_round_trip_through_hrnets_file_and_hub_directory(tmp_path):
    model = three_class_model()
    save_checkpoint(model, tmp_path / "m.safetensors")
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["class_names"]) == list(NAMES)
    loaded = create_model("w18-small", checkpoint=tmp_path / "m.safetensors")
    assert loaded.num_classes == 3 and loaded.class_names == NAMES
    # a new head of another size does not inherit the file's names
    assert create_model("w18-small", checkpoint=tmp_path / "m.safetensors", num_classes=5).class_names is None
    save_checkpoint(model, tmp_path / "hub", hub=True)
    config = json.loads((tmp_path / "hub" / "config.json").read_text())
    assert config["label_names"] == list(NAMES)
    assert config["id2label"] == {"0": "cat", "1": "dog", "2": "bird"} and config["label2id"]["bird"] == 2
    assert create_model("w18-small", checkpoint=tmp_path / "hub").class_names == NAMES
    # convert carries them: hrnet -> hub -> hrnet
    assert convert_checkpoint(tmp_path / "hub", tmp_path / "back.safetensors", progress=False)["class_names"] == list(NAMES)
    assert create_model("w18-small", checkpoint=tmp_path / "back.safetensors").class_names == NAMES


def test_names_round_trip_through_mmcls_meta(tmp_path):
    save_checkpoint(three_class_model(), tmp_path / "m.safetensors")
    convert_checkpoint(tmp_path / "m.safetensors", tmp_path / "mm.pth", to="mmcls", progress=False)
    meta = torch.load(tmp_path / "mm.pth", weights_only=True)["meta"]
    assert meta["CLASSES"] == list(NAMES) and meta["dataset_meta"] == {"classes": list(NAMES)}  # mmcls 0.x, mmpretrain
    assert create_model("w18-small", checkpoint=tmp_path / "mm.pth").class_names == NAMES


def test_a_zoo_checkpoint_converted_gets_imagenets_names(tmp_path):
    model = randomize(create_model("w18-small"), seed=1)  # 1000 classes, no names in the file
    torch.save(model.state_dict(), tmp_path / "official.pth")
    out = convert_checkpoint(tmp_path / "official.pth", tmp_path / "hub", hub=True, progress=False)
    assert out["class_names"] == list(timm.data.ImageNetInfo().label_descriptions())


def _with_names(src, dst, text):
    """A copy of hrnet file ``src`` whose class_names metadata is ``text`` (what a hostile writer could store)."""
    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
    save_file(load_file(str(src)), str(dst), metadata={**meta, "class_names": text})


@pytest.mark.parametrize("names, message", [
    (json.dumps(["cat", "\x1b[31mdog", "bird"]), "holds the control character '\\x1b'"),
    (json.dumps(["cat", "dog\u202e", "bird"]), "holds the control character"),  # a bidi override
    (json.dumps(["cat", "d" * 257, "bird"]), "class name 1 has 257 characters, more than 256"),
    (json.dumps(["cat", 3, "bird"]), "class name 1 must be a non-empty string"),
    (json.dumps({"0": "cat"}), "class names must be a list of strings"),
    (json.dumps(["cat", "dog"]), "2 class names for 3 classes"),
    (json.dumps([f"c{i}" for i in range(100_001)]), "100001 class names, more than the 100,000 allowed"),
    ("[not json", "unreadable class names"),
])
def test_hostile_names_in_a_file_are_refused_in_one_line(tmp_path, capsys, names, message):
    save_checkpoint(three_class_model(), tmp_path / "ok.safetensors")
    bad = tmp_path / "bad.safetensors"
    _with_names(tmp_path / "ok.safetensors", bad, names)
    with pytest.raises(CheckpointError, match="bad.safetensors") as e:
        create_model("w18-small", checkpoint=bad)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert main(["convert", str(bad), str(tmp_path / "out"), "--to", "timm", "--hub", "-q"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "bad.safetensors" in err, err


def test_a_model_with_bad_names_is_not_written(tmp_path):
    model = three_class_model()
    model.class_names = ("cat", "dog\nrm -rf", "bird")
    with pytest.raises(CheckpointError, match=r"m\.safetensors: class name 1 .* control character '\\n'"):
        save_checkpoint(model, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


def test_a_hub_config_with_hostile_label_names_is_refused(tmp_path):
    model = three_class_model()
    hrnet.weights.write_checkpoint(model, tmp_path / "t", format="timm", hub=True)
    config = json.loads((tmp_path / "t" / "config.json").read_text())
    (tmp_path / "t" / "config.json").write_text(json.dumps({**config, "label_names": ["a", "b\x07", "c"]}))
    with pytest.raises(CheckpointError, match=r"config\.json: class name 1 .*control character"):
        load_checkpoint(tmp_path / "t")


@pytest.mark.slow
def test_class_names_travel_into_onnx_and_back(tmp_path):
    import onnx

    from hrnet.deploy import export_onnx
    from hrnet.deploy.engine import Classifier

    model = create_model("w18-small", num_classes=3).eval()
    model.class_names = ("cat", "dog", "bird")
    path = export_onnx(model, tmp_path / "m.onnx", input_size=(32, 32), check=False)
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(meta["hrnet.class_names"]) == ["cat", "dog", "bird"]
    assert Classifier.build("hrnet-w18-small", checkpoint=path).labels == ["cat", "dog", "bird"]
    assert Classifier.build(model).labels == ["cat", "dog", "bird"]
