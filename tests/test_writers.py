"""Writing weights in other libraries' layouts: what those libraries load, and exact round trips.

Independent references: timm's HRNet (classifier and features_only extractor) loads the official and
timm files strictly; the mmcls file is compared with the test's own key map (``to_mmcls`` in
test_weights, written from REFERENCE.md §3); the source files for the round trips are written by
timm and by the fixtures of test_weights, not by hrnet.
"""

from __future__ import annotations

import pathlib
import pickle

import pytest
import timm
import torch
from helpers import randomize
from safetensors.torch import save_file
from test_weights import assert_logits_close, logits, to_mmcls, to_paddle
from torch import nn

import hrnet
from hrnet import create_model
from hrnet.weights import KeyMismatchError, load_checkpoint, save_checkpoint
from hrnet.weights import to_layout, write_checkpoint

SMALL = "hrnet-w18-small"
HEAD = ("incre_modules.", "downsamp_modules.", "final_layer.", "classifier.")


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(11))


def _source(kind: str, directory: pathlib.Path) -> pathlib.Path:
    """A W18-small checkpoint in ``kind``'s layout, written without hrnet's writers."""
    if kind == "hrnet":
        return save_checkpoint(randomize(create_model(SMALL, num_classes=5), seed=21), directory / "hrnet.safetensors")
    reference = randomize(timm.create_model("hrnet_w18_small", pretrained=False, num_classes=5,
                                            head_conv_bias=kind in ("official", "timm")), seed=22)
    sd = reference.state_dict()
    path = directory / f"{kind}.bin"
    if kind == "official":
        torch.save(sd, path)
    elif kind == "timm":  # timm's hub file
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
    elif kind == "mmcls":
        torch.save({"meta": {"mmcls_version": "0.25.0"}, "state_dict": to_mmcls(sd)}, path)
    else:
        path.write_bytes(pickle.dumps(to_paddle(reference, (1, 1, 1)), protocol=4))
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, pathlib.Path]:
    directory = tmp_path_factory.mktemp("sources")
    return {kind: _source(kind, directory) for kind in ("hrnet", "official", "timm", "mmcls", "paddle")}


def _plain_file(path: pathlib.Path) -> dict:
    """The file as torch.load(weights_only=True) reads it, checked to hold only plain tensors (and mmcls's meta)."""
    content = torch.load(path, weights_only=True)
    sd = content["state_dict"] if "meta" in content else content
    assert all(type(v) is torch.Tensor for v in sd.values())
    if "meta" in content:
        assert all(isinstance(k, str) and isinstance(v, (str, int)) for k, v in content["meta"].items())
    return content


@pytest.mark.parametrize("dst", ["hrnet", "official", "timm", "mmcls"])
@pytest.mark.parametrize("src", ["hrnet", "official", "timm", "mmcls", "paddle"])
@pytest.mark.slow
def test_any_format_to_any_format_reads_back_to_identical_weights_and_logits(tmp_path, x, sources, src, dst):
    sd, meta = load_checkpoint(sources[src])
    out = write_checkpoint(sd, tmp_path / f"out-{dst}", format=dst)
    if dst != "hrnet":
        _plain_file(out)
    back, back_meta = load_checkpoint(out)
    assert back_meta["format"] == {"timm": "official"}.get(dst, dst)  # timm's layout is the official one
    assert (back_meta["arch"], back_meta["num_classes"]) == ("w18-small", "5")
    assert back.keys() == sd.keys() and all(torch.equal(back[k], v) for k, v in sd.items())
    written, source = create_model(SMALL, checkpoint=out), create_model(SMALL, checkpoint=sources[src])
    assert torch.equal(logits(written, x), logits(source, x))


@pytest.mark.slow
def test_w18_official_round_trip_and_timm_loads_it_strictly_with_equal_logits(tmp_path, x):
    model = randomize(create_model("hrnet-w18"), seed=23)
    ours = logits(model, x)
    path = write_checkpoint(model, tmp_path / "hrnet_w18.pth", format="timm")
    reference = timm.create_model("hrnet_w18", pretrained=False)
    reference.load_state_dict(_plain_file(path), strict=True)
    assert_logits_close(logits(reference, x), ours)
    # the route the issue names: timm's own loader, strict for a classifier
    overlay = timm.create_model("hrnet_w18", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert torch.equal(logits(overlay, x), logits(reference, x))
    official = write_checkpoint(model, tmp_path / "official.pth", format="official")
    assert torch.equal(logits(create_model("hrnet-w18", checkpoint=official), x), ours)


def test_official_file_has_timm_key_set_order_and_zero_head_biases(tmp_path):
    model = randomize(create_model(SMALL), seed=24)
    content = _plain_file(write_checkpoint(model, tmp_path / "official.pth", format="official"))
    reference = timm.create_model("hrnet_w18_small", pretrained=False).state_dict()  # head_conv_bias=True
    assert list(content) == list(reference)
    assert all(content[k].shape == v.shape for k, v in reference.items())
    biases = [k for k in content if k not in model.state_dict()]
    assert biases == ["downsamp_modules.0.0.bias", "downsamp_modules.1.0.bias", "downsamp_modules.2.0.bias",
                      "final_layer.0.bias"]
    assert all(not content[k].any() for k in biases)
    assert all(torch.equal(content[k], v) for k, v in model.state_dict().items())  # BatchNorm unchanged


def _timm_features(location: str) -> nn.Module:
    return timm.create_model("hrnet_w18_small", pretrained=False, features_only=True, feature_location=location)


def test_backbone_only_official_loads_strictly_into_timm_features_with_equal_features(tmp_path, x):
    model = randomize(create_model(SMALL), seed=25)
    path = write_checkpoint(model, tmp_path / "backbone.pth", format="official", backbone_only=True)
    content = _plain_file(path)
    assert not [k for k in content if k.startswith(HEAD)]
    reference = _timm_features("")  # stem, layer1, transitions and stages: the dense-prediction backbone
    reference.load_state_dict(content, strict=True)
    ours = create_model(SMALL, checkpoint=path, features_only=True, feature_location="").eval()
    with torch.no_grad():
        for got, want in zip(ours(x), reference.eval()(x)[1:], strict=True):
            assert_logits_close(got, want)
    _, meta = load_checkpoint(path)
    assert (meta["format"], meta["num_classes"]) == ("official", "0")


def test_full_official_file_minus_classification_tail_loads_into_timm_incre_features(tmp_path):
    model = randomize(create_model(SMALL), seed=26)
    content = _plain_file(write_checkpoint(model, tmp_path / "official.pth", format="official"))
    tail = ("downsamp_modules.", "final_layer.", "classifier.")
    _timm_features("incre").load_state_dict({k: v for k, v in content.items() if not k.startswith(tail)}, strict=True)


def test_mmcls_file_equals_an_independent_construction(tmp_path):
    model = randomize(create_model(SMALL, num_classes=5), seed=27)
    content = _plain_file(write_checkpoint(model, tmp_path / "mmcls.pth", format="mmcls", metadata={"note": "tuned"}))
    expected = to_mmcls(model.state_dict())
    assert list(content["state_dict"]) == list(expected)
    assert all(torch.equal(content["state_dict"][k], v) for k, v in expected.items())
    assert content["meta"] == {"arch": "w18-small", "num_classes": 5, "hrnet_version": hrnet.__version__,
                               "model": SMALL, "note": "tuned"}
    backbone = _plain_file(write_checkpoint(model, tmp_path / "mmcls-backbone.pth", format="mmcls", backbone_only=True))
    assert backbone["state_dict"].keys() == {k for k in expected if k.startswith("backbone.")}
    assert backbone["meta"]["num_classes"] == 0


def test_hrnet_backbone_only_loads_into_a_feature_extractor(tmp_path, x):
    model = randomize(create_model(SMALL), seed=28)
    path = write_checkpoint(model, tmp_path / "backbone.safetensors", backbone_only=True)
    sd, meta = load_checkpoint(path)
    assert (meta["format"], meta["num_classes"], meta["model"]) == ("hrnet", "0", SMALL)
    assert not [k for k in sd if k.startswith(HEAD)]
    ours = create_model(SMALL, checkpoint=path, features_only=True, feature_location="").eval()
    full = create_model(SMALL, features_only=True, feature_location="")
    full.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith(HEAD)})
    with torch.no_grad():
        for got, want in zip(ours(x), full.eval()(x), strict=True):
            assert torch.equal(got, want)


def test_feature_extractor_state_dict_writes_its_own_keys(tmp_path):
    features = randomize(create_model(SMALL, features_only=True, feature_location="incre"), seed=29)
    content = to_layout(features.state_dict(), "w18-small", "official")
    assert content.keys() == _timm_features("incre").state_dict().keys()


@pytest.mark.slow
def test_bad_requests_are_refused_with_one_line_errors(tmp_path):
    sd = create_model(SMALL).state_dict()
    with pytest.raises(ValueError, match="cannot write the 'caffe' layout; one of hrnet, official, timm, mmcls, paddle"):
        write_checkpoint(sd, tmp_path / "a.caffemodel", format="caffe")
    with pytest.raises(ValueError, match="paddle checkpoint is a bare state dict with no room for metadata"):
        write_checkpoint(sd, tmp_path / "a.pdparams", format="paddle", metadata={"note": "x"})
    with pytest.raises(ValueError, match="official checkpoint is a bare state dict with no room for metadata"):
        write_checkpoint(sd, tmp_path / "a.pth", format="official", metadata={"note": "x"})
    with pytest.raises(ValueError, match=r"metadata keys \['arch'\] are written by hrnet itself"):
        write_checkpoint(sd, tmp_path / "a.pth", format="mmcls", metadata={"arch": "x"})
    with pytest.raises(KeyMismatchError, match=r"state dict: keys do not match w18; .*mis-shaped"):
        write_checkpoint(sd, tmp_path / "a.pth", format="timm", arch="w18")
    official = to_layout(sd, "w18-small", "official")  # already written: not hrnet's keys any more
    with pytest.raises(KeyMismatchError, match="unexpected 4: downsamp_modules.0.0.bias"):
        to_layout(official, "w18-small", "mmcls")
    with pytest.raises(KeyMismatchError, match="match no HRNet architecture"):
        write_checkpoint({"conv1.weight": torch.zeros(1)}, tmp_path / "a.pth", format="timm")
    partial = {k: v for k, v in sd.items() if not k.startswith(("downsamp_modules.", "final_layer."))}
    with pytest.raises(KeyMismatchError, match="head must be whole or cut after one of its parts; this one has only incre_modules, classifier"):
        write_checkpoint(partial, tmp_path / "a.safetensors", arch="w18-small")
    assert list(tmp_path.iterdir()) == []


def test_convert_command_writes_what_timm_and_a_backbone_load(tmp_path, sources, capsys):
    from hrnet.cli import main

    out = tmp_path / "for-timm.pth"
    assert main(["convert", str(sources["paddle"]), str(out), "--to", "timm", "--json", "-q"]) == 0
    assert '"format": "timm"' in capsys.readouterr().out
    reference = timm.create_model("hrnet_w18_small", pretrained=False, num_classes=5).eval()
    reference.load_state_dict(torch.load(out, weights_only=True), strict=True)
    model = create_model(SMALL, checkpoint=sources["paddle"]).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(reference(x), model(x), rtol=1e-5, atol=1e-5)
    backbone = tmp_path / "backbone.pth"
    assert main(["convert", str(sources["paddle"]), str(backbone), "--to", "official", "--backbone-only"]) == 0
    trunk = timm.create_model("hrnet_w18_small", pretrained=False, features_only=True, feature_location="")
    trunk.load_state_dict(torch.load(backbone, weights_only=True), strict=True)
    assert main(["convert", str(sources["paddle"]), str(tmp_path / "hub"), "--to", "mmcls", "--hub"]) == 1
    assert "hub directory holds hrnet's format or timm's folder" in capsys.readouterr().err
