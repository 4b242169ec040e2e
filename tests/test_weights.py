"""Weights: every checkpoint layout loads to the logits of the implementation that wrote it, safely.

References are independent of hrnet: timm's HRNet produces the official/timm files and the logits
to match; the mmcls and PaddleClas fixtures are timm weights renamed by maps written out below from
the layouts documented in REFERENCE.md §3 (neither framework is installable in the test
environment), not by hrnet's own key maps.
"""

from __future__ import annotations

import json
import pathlib
import pickle
import warnings

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

import hrnet
from helpers import randomize
from hrnet import create_model
from hrnet.weights import (CheckpointError, KeyMismatchError, UnsafeCheckpointError, load_checkpoint,
                           save_checkpoint)

SMALL = "hrnet-w18-small"


def assert_logits_close(ours: torch.Tensor, reference: torch.Tensor) -> None:
    """Equal to 1e-5 relative to the largest reference logit."""
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5 * reference.abs().max().item())


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def timm_small() -> nn.Module:
    """timm's W18-small with head conv biases (the official layout), as the reference implementation."""
    model = randomize(timm.create_model("hrnet_w18_small", pretrained=False))
    assert model.final_layer[0].bias.abs().sum() > 0 and model.downsamp_modules[0][0].bias is not None
    return model


@pytest.fixture(scope="module")
def official_file(tmp_path_factory, timm_small) -> pathlib.Path:
    path = tmp_path_factory.mktemp("official") / "hrnet_w18_small.pth"
    torch.save(timm_small.state_dict(), path)
    return path


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def test_hrnet_format_round_trip_gives_identical_logits_and_metadata(tmp_path, x):
    model = randomize(create_model(SMALL, num_classes=7))
    path = save_checkpoint(model, tmp_path / "mine.safetensors", metadata={"note": "fine-tuned"})
    loaded = create_model(SMALL, num_classes=7, checkpoint=path)
    assert torch.equal(logits(loaded, x), logits(model, x))
    sd, meta = load_checkpoint(path)
    evaluation = json.loads(meta.pop("eval"))  # the mmcls pipeline of REFERENCE.md §4
    assert evaluation == {"input_size": 224, "resize_size": 256, "interpolation": "bilinear", "crop_pct": 0.875,
                          "mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375]}
    assert meta == {"format": "hrnet", "arch": "w18-small", "num_classes": "7", "model": SMALL,
                    "hrnet_version": hrnet.__version__, "note": "fine-tuned"}
    assert sd.keys() == model.state_dict().keys()


def test_fine_tuned_checkpoint_brings_its_classifier_without_num_classes(tmp_path, x):
    model = randomize(create_model(SMALL, num_classes=7))
    path = save_checkpoint(model, tmp_path / "tuned.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is skipped, so nothing to warn about
        loaded = create_model(SMALL, checkpoint=path)
    assert loaded.num_classes == 7 and torch.equal(logits(loaded, x), logits(model, x))


@pytest.mark.parametrize("variant", ["plain", "state_dict+module", "model", "legacy", "safetensors"])
@pytest.mark.slow
def test_official_and_timm_files_match_timm_logits(tmp_path, x, timm_small, variant):
    sd = timm_small.state_dict()
    path = tmp_path / "weights.pth"  # the same name for every container: detection reads the bytes
    if variant == "plain":
        torch.save(sd, path)
    elif variant == "state_dict+module":  # a DDP training checkpoint (.pth.tar style)
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    elif variant == "model":
        torch.save({"model": sd}, path)
    elif variant == "legacy":
        torch.save(sd, path, _use_new_zipfile_serialization=False)
    else:
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
    model = create_model(SMALL, checkpoint=path)
    assert_logits_close(logits(model, x), logits(timm_small, x))


def test_timm_hub_directory_loads(tmp_path, x, timm_small):
    """timm's hub repos hold config.json + model.safetensors in the official layout."""
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "hrnet_w18_small", "num_classes": 1000}))
    save_file({k: v.contiguous() for k, v in timm_small.state_dict().items()}, tmp_path / "model.safetensors")
    assert_logits_close(logits(create_model(SMALL, checkpoint=tmp_path), x), logits(timm_small, x))


def test_hrnet_hub_directory_round_trip(tmp_path, x):
    model = randomize(create_model(SMALL))
    save_checkpoint(model, tmp_path / "hub", hub=True)
    config = json.loads((tmp_path / "hub" / "config.json").read_text())
    assert (config["format"], config["arch"], config["num_classes"], config["model"]) == ("hrnet", "w18-small", 1000, SMALL)
    assert torch.equal(logits(create_model(SMALL, checkpoint=tmp_path / "hub"), x), logits(model, x))


def to_mmcls(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """REFERENCE §3: backbone under 'backbone.', head under 'neck.0.' (ConvModule .conv/.bn), fc under 'head.'."""
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if parts[0] == "incre_modules":
            name = "neck.0.increase_layers." + ".".join(parts[1:])
        elif parts[0] == "downsamp_modules":
            name = f"neck.0.downsample_layers.{parts[1]}.{['conv', 'bn'][int(parts[2])]}." + ".".join(parts[3:])
        elif parts[0] == "final_layer":
            name = f"neck.0.final_layer.{['conv', 'bn'][int(parts[1])]}." + ".".join(parts[2:])
        elif parts[0] == "classifier":
            name = "head.fc." + parts[1]
        else:
            name = "backbone." + k
        out[name] = v
    return out


def test_mmcls_checkpoint_matches_timm_logits(tmp_path, x):
    reference = randomize(timm.create_model("hrnet_w18_small", pretrained=False, head_conv_bias=False), seed=2)
    path = tmp_path / "hrnet-w18-small_mmcls.pth"
    torch.save({"meta": {"mmcls_version": "0.20.1", "CLASSES": ["tench", "goldfish"]},
                "state_dict": to_mmcls(reference.state_dict())}, path)
    assert_logits_close(logits(create_model(SMALL, checkpoint=path), x), logits(reference, x))


def paddle_names(model: nn.Module, stage_modules: tuple[int, ...]) -> dict[str, str]:
    """timm module prefix -> PaddleClas ConvBNLayer prefix, walking the architecture in PaddleClas's
    construction order (its fuse layers form one flat list per module)."""
    names = {"conv1": "conv_layer1_1.conv", "bn1": "conv_layer1_1.bn",
             "conv2": "conv_layer1_2.conv", "bn2": "conv_layer1_2.bn"}

    def bottleneck(src: str, dst: str) -> None:
        for n in (1, 2, 3):
            names[f"{src}.conv{n}"], names[f"{src}.bn{n}"] = f"{dst}.conv{n}.conv", f"{dst}.conv{n}.bn"
        names[f"{src}.downsample.0"], names[f"{src}.downsample.1"] = f"{dst}.conv_down.conv", f"{dst}.conv_down.bn"

    def conv_bn(src: str, dst: str) -> None:
        names[f"{src}.0"], names[f"{src}.1"] = f"{dst}.conv", f"{dst}.bn"

    for i in range(len(model.layer1)):
        bottleneck(f"layer1.{i}", f"layer1.{i}")
    conv_bn("transition1.0", "conv_tr1_1")
    conv_bn("transition1.1.0", "conv_tr1_2")
    conv_bn("transition2.2.0", "conv_tr2")
    conv_bn("transition3.3.0", "conv_tr3")
    for s, modules in zip((2, 3, 4), stage_modules):
        for m in range(modules):
            src, dst = f"stage{s}.{m}", f"st{s}.stage_func_list.{m}"
            for b in range(s):
                for k in range(len(model.get_submodule(f"{src}.branches.{b}"))):
                    for n in (1, 2):
                        names[f"{src}.branches.{b}.{k}.conv{n}"] = f"{dst}.basic_block_list.{b}.{k}.conv{n}.conv"
                        names[f"{src}.branches.{b}.{k}.bn{n}"] = f"{dst}.basic_block_list.{b}.{k}.conv{n}.bn"
            flat = 0
            for i in range(s):
                for j in range(s):
                    chain = [f"{src}.fuse_layers.{i}.{j}"] if j > i else [f"{src}.fuse_layers.{i}.{j}.{k}" for k in range(i - j)]
                    for prefix in chain:
                        conv_bn(prefix, f"{dst}.fuse_func.residual_func_list.{flat}")
                        flat += 1
    for i in range(4):
        bottleneck(f"incre_modules.{i}.0", f"last_cls.func_list.{i}")
    for i in range(3):
        conv_bn(f"downsamp_modules.{i}", f"cls_head_conv_list.{i}")
    conv_bn("final_layer", "conv_last")
    return names


def to_paddle(model: nn.Module, stage_modules: tuple[int, ...]) -> dict[str, object]:
    """A paddle.save'd state dict: numpy arrays, BN '_mean'/'_variance', no num_batches_tracked,
    fc weight [in, out], plus Paddle's structured-name table."""
    names = paddle_names(model, stage_modules)
    out: dict[str, object] = {}
    for key, value in model.state_dict().items():
        module, leaf = key.rsplit(".", 1)
        if leaf == "num_batches_tracked":
            continue
        if module == "classifier":
            out[f"fc.{leaf}"] = (value.t() if leaf == "weight" else value).numpy().copy()
            continue
        leaf = {"running_mean": "_mean", "running_var": "_variance"}.get(leaf, leaf)
        out[f"{names[module]}.{leaf}"] = value.numpy().copy()
    out["StructuredToParameterName@@"] = {k: f"param_{i}" for i, k in enumerate(out)}
    return out


@pytest.fixture(scope="module")
def paddle_w18(tmp_path_factory) -> tuple[nn.Module, pathlib.Path]:
    """PaddleClas ships only the standard widths, so this fixture is a full W18 (stage modules 1/4/3)."""
    reference = randomize(timm.create_model("hrnet_w18", pretrained=False, head_conv_bias=False), seed=3)
    path = tmp_path_factory.mktemp("paddle") / "HRNet_W18_C_pretrained.pdparams"
    path.write_bytes(pickle.dumps(to_paddle(reference, (1, 4, 3)), protocol=4))
    return reference, path


@pytest.mark.slow
def test_paddle_pdparams_matches_timm_logits(tmp_path, x, paddle_w18):
    reference, path = paddle_w18
    expected = logits(reference, x)
    assert_logits_close(logits(create_model("hrnet-w18", checkpoint=path), x), expected)
    # protocol 2 (older Paddle) spells bytes through _codecs.encode; still numpy arrays only
    old = tmp_path / "old.pdparams"
    old.write_bytes(pickle.dumps(pickle.loads(path.read_bytes()), protocol=2))
    sd, meta = load_checkpoint(old)
    assert (meta["format"], meta["arch"], meta["num_classes"]) == ("paddle", "w18", "1000")
    torch.testing.assert_close(sd["classifier.weight"], reference.classifier.weight.detach())


def test_weights_of_another_width_are_refused_naming_that_width(paddle_w18, official_file):
    with pytest.raises(KeyMismatchError, match=r"holds w18 weights \(hrnet-w18, hrnet-w18-ssld\), but the model "
                                               r"is hrnet-w18-small \(w18-small\)"):
        create_model(SMALL, checkpoint=paddle_w18[1])
    with pytest.raises(KeyMismatchError, match="holds w18-small weights .* the model is hrnet-w18-small-v2"):
        create_model("hrnet-w18-small-v2", checkpoint=official_file)


@pytest.mark.slow
def test_key_mismatch_names_missing_unexpected_and_misshaped_keys(tmp_path, timm_small):
    sd = dict(timm_small.state_dict())
    del sd["layer1.0.bn2.running_var"]
    sd["stage2.0.extra.weight"] = torch.zeros(1)
    sd["conv2.weight"] = torch.zeros(64, 64, 1, 1)
    path = tmp_path / "broken.pth"
    torch.save(sd, path)
    with pytest.raises(KeyMismatchError) as e:
        create_model(SMALL, checkpoint=path)
    message = str(e.value)
    assert str(path) in message and "\n" not in message
    for part in ("missing 1: layer1.0.bn2.running_var", "unexpected 1: stage2.0.extra.weight",
                 "mis-shaped 1: conv2.weight [64, 64, 1, 1] != [64, 64, 3, 3]"):
        assert part in message


def test_other_num_classes_loads_all_but_classifier_with_warning(x, official_file, timm_small):
    with pytest.warns(UserWarning, match="1000 classes, the model 10: loaded everything but the classifier"):
        model = create_model(SMALL, checkpoint=official_file, num_classes=10).eval()
    with torch.no_grad():
        assert_logits_close(model.forward_head(model.forward_features(x), pre_logits=True),
                            timm_small.forward_head(timm_small.forward_features(x), pre_logits=True))
    assert model.classifier.out_features == 10
    assert all(p.requires_grad and p.is_leaf for p in model.parameters())  # ready to fine-tune


@pytest.mark.parametrize("location", ["incre", ""])
def test_feature_extractor_loads_its_keys_and_ignores_the_head(official_file, timm_small, location):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no classifier warning: an extractor has no head to load
        features = create_model(SMALL, checkpoint=official_file, features_only=True, feature_location=location)
    reference = timm_small.state_dict()
    for key, value in features.state_dict().items():
        assert torch.equal(value, reference[key]), key


def test_explicit_layout_must_match_the_content(official_file):
    with pytest.raises(CheckpointError, match="is a checkpoint in the official layout, not paddle"):
        load_checkpoint(official_file, layout="paddle")
    assert load_checkpoint(official_file, layout="timm")[1]["format"] == "official"


def _corrupt(kind: str, path: pathlib.Path, official_file: pathlib.Path) -> None:
    sd = torch.load(official_file, weights_only=True)
    if kind == "truncated safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
    elif kind == "truncated torch zip":
        torch.save(sd, path)
    elif kind == "truncated legacy torch":
        torch.save(sd, path, _use_new_zipfile_serialization=False)
    elif kind == "truncated pdparams":
        path.write_bytes(pickle.dumps({k: v.numpy() for k, v in sd.items()}, protocol=4))
    if kind.startswith("truncated"):
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "garbage":
        path.write_bytes(b"<html>404 not found</html>")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "a tensor, not a dict":
        torch.save(torch.zeros(3), path)


@pytest.mark.parametrize("kind", ["truncated safetensors", "truncated torch zip", "truncated legacy torch",
                                  "truncated pdparams", "garbage", "empty", "a tensor, not a dict"])
def test_corrupt_files_give_one_line_errors_naming_the_file(tmp_path, official_file, kind):
    path = tmp_path / "bad.pth"
    _corrupt(kind, path, official_file)
    with pytest.raises(CheckpointError) as e:
        create_model(SMALL, checkpoint=path)
    assert isinstance(e.value, hrnet.HRNetError)
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)


class Payload:
    """Unpickling this creates ``marker``: the stand-in for code hidden in a checkpoint."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


@pytest.mark.parametrize("container", ["torch zip", "legacy torch", "pdparams"])
def test_checkpoint_with_code_payload_is_refused_and_never_runs(tmp_path, container):
    marker = tmp_path / "payload-ran"
    path = tmp_path / ("evil.pdparams" if container == "pdparams" else "evil.pth")
    content = {"conv1.weight": torch.zeros(1), "extra": Payload(marker)}
    if container == "pdparams":
        path.write_bytes(pickle.dumps({"conv_layer1_1.conv.weight": np.zeros(1), "x": Payload(marker)}, protocol=4))
        pickle.loads(path.read_bytes())  # the payload is real: a plain unpickler runs it
    else:
        torch.save(content, path, _use_new_zipfile_serialization=container == "torch zip")
        torch.load(path, weights_only=False)  # the payload is real: an unrestricted load runs it
    assert marker.exists()
    marker.unlink()

    with pytest.raises(UnsafeCheckpointError) as e:
        create_model(SMALL, checkpoint=path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint(path)
    assert not marker.exists()
