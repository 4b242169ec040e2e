"""Dense features: the HRNetV2 representation against an independent construction, feature_info against
the real outputs and the real module tree, and parity with timm's feature extractor."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import hrnet
from hrnet.weights import save_checkpoint, write_checkpoint
from helpers import randomize, rel_err

SMALL = "hrnet-w18-small"
ROOT = Path(__file__).parents[1]
LOCATIONS = {"incre": (0, 1, 2, 3, 4), "": (0, 1, 2, 3, 4), "hrnetv2": (0, 1)}


def _features(location: str, out_indices=None, name: str = SMALL, seed: int = 40):
    model = hrnet.create_model(name, features_only=True, feature_location=location, out_indices=out_indices)
    return randomize(model, seed=seed)


@pytest.mark.parametrize("size", [(224, 224), (200, 250)])
def test_hrnetv2_equals_interpolate_and_cat_of_the_raw_branches(size):
    raw = _features("")
    dense = _features("hrnetv2")
    dense.load_state_dict(raw.state_dict(), strict=True)  # the same keys: backbone checkpoints load into both
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        (got,) = dense(x)
        branches = raw(x)
    top = branches[0].shape[-2:]
    want = torch.cat([F.interpolate(b, size=top, mode="bilinear", align_corners=False) for b in branches], dim=1)
    assert got.shape == (2, 16 + 32 + 64 + 128, -(-size[0] // 4), -(-size[1] // 4))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_resize_is_bilinear_with_half_pixel_centres():
    # Hand-computed: a 2x2 map [[0, 1], [2, 3]] resized to 4x4 samples source positions
    # (d + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25, clamped: weights t = 0, 0.25, 0.75, 1 per axis.
    t = torch.tensor([0.0, 0.25, 0.75, 1.0])
    expected = 2 * t[:, None] + t[None, :]
    low = torch.tensor([[0.0, 1.0], [2.0, 3.0]]).view(1, 1, 2, 2)
    out = _features("hrnetv2").resize_concat([torch.zeros(1, 1, 4, 4), low])
    assert out.shape == (1, 2, 4, 4)
    assert torch.equal(out[0, 0], torch.zeros(4, 4))
    torch.testing.assert_close(out[0, 1], expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize("name", ["hrnet-w18", "hrnet-w48"])
def test_hrnetv2_has_fifteen_times_the_width_at_stride_four(name):
    with torch.device("meta"):  # shapes only
        model = hrnet.create_model(name, features_only=True, feature_location="hrnetv2")
    width = int(name.removeprefix("hrnet-w"))
    assert model.feature_info.channels() == [width + 2 * width + 4 * width + 8 * width] == [{18: 270, 48: 720}[width]]
    assert model.feature_info.reduction() == [4]


@pytest.mark.parametrize("location", list(LOCATIONS))
@pytest.mark.parametrize("size", [(64, 64), (50, 70)])
def test_feature_info_matches_every_output_and_names_real_modules(location, size):
    every = LOCATIONS[location]
    model = _features(location, out_indices=every)
    with torch.no_grad():
        feats = model(torch.randn(1, 3, *size))
    info = model.feature_info
    assert [f.index for f in info] == list(every) and len(feats) == len(info)
    for f, out in zip(info, feats, strict=True):
        stride = f.stride
        assert out.shape[1:] == (f.channels, -(-size[0] // stride), -(-size[1] // stride)), (location, f)
    modules = dict(model.named_modules())
    assert all(name in modules for name in info.module_name())
    for i in every[1:]:  # each subset describes exactly its own outputs
        alone = _features(location, out_indices=(i,))
        assert alone.feature_info == [info[i]]
        with torch.no_grad():
            assert [o.shape for o in alone(torch.randn(1, 3, *size))] == [feats[i].shape]


def test_module_names_are_the_modules_that_compute_each_feature():
    # A forward hook on each named module sees the feature itself (the stem's BatchNorm output is
    # rectified in place by the ReLU that follows it, so the hook's tensor is the stem feature).
    for location, every in LOCATIONS.items():
        model = _features(location, out_indices=every)
        modules = dict(model.named_modules())
        seen: dict[str, object] = {}
        hooks = [modules[n].register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o))
                 for n in set(model.feature_info.module_name())]
        with torch.no_grad():
            feats = model(torch.randn(1, 3, 64, 64))
        for h in hooks:
            h.remove()
        for f, out in zip(model.feature_info, feats, strict=True):
            hooked = seen[f.module]
            hooked = hooked[f.index - 1] if isinstance(hooked, list) else hooked  # stage4: the list of branches
            assert torch.equal(hooked, out), (location, f)


def test_accessors_answer_like_timms():
    info = _features("", out_indices=(0, 2, 4)).feature_info
    assert info.channels() == [64, 32, 128] and info.reduction() == [2, 8, 32]
    assert info.module_name() == ["bn1", "stage4", "stage4"]
    assert info.channels(1) == 32 and info.reduction(-1) == 32 and info.module_name(0) == "bn1"
    assert info.channels([0, 2]) == [64, 128]
    assert [(f.channels, f.stride) for f in info] == [(64, 2), (32, 8), (128, 32)]
    classifier = hrnet.create_model(SMALL)
    modules = dict(classifier.named_modules())
    assert classifier.feature_info.channels() == [64, 128, 256, 512, 1024]
    assert all(n in modules for n in classifier.feature_info.module_name())


def test_hrnetv2_indices_and_bad_requests():
    model = _features("hrnetv2")
    assert model.out_indices == (1,)
    with torch.no_grad():
        assert len(model(torch.randn(1, 3, 32, 32))) == 1
    stem, dense = _features("hrnetv2", out_indices=(1, 0))(torch.randn(1, 3, 32, 32))
    assert (stem.shape[1:], dense.shape[1:]) == ((64, 16, 16), (240, 8, 8))
    with pytest.raises(ValueError, match=r"feature_location='hrnetv2' must be distinct values in 0 \(stem\) and 1"):
        hrnet.create_model(SMALL, features_only=True, feature_location="hrnetv2", out_indices=(2,))
    with pytest.raises(ValueError, match="feature_location must be one of 'incre', '', 'hrnetv2', got 'v2'"):
        # refused before the (missing) checkpoint is looked at
        hrnet.create_model(SMALL, features_only=True, feature_location="v2", checkpoint="/nonexistent.pth")
    with pytest.raises(TypeError, match="need features_only=True"):
        hrnet.create_model(SMALL, feature_location="hrnetv2")


@pytest.mark.parametrize("location", ["", "incre"])
@pytest.mark.slow
def test_official_file_loads_into_timm_features_with_equal_maps_and_info(tmp_path, location):
    classifier = randomize(hrnet.create_model(SMALL), seed=41)
    path = write_checkpoint(classifier, tmp_path / "official.pth", format="official")
    # the user's route: timm's pretrained loading from a local file
    ref = timm.create_model("hrnet_w18_small", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                            features_only=True, feature_location=location).eval()
    ours = hrnet.create_model(SMALL, checkpoint=path, features_only=True, feature_location=location,
                              out_indices=(0, 1, 2, 3, 4)).eval()
    assert ours.feature_info.channels() == ref.feature_info.channels()
    assert ours.feature_info.reduction() == ref.feature_info.reduction()
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        for a, b in zip(ours(x), ref(x), strict=True):
            assert a.shape == b.shape and rel_err(a, b) < 1e-5
        if location == "":  # and HRNetV2 over timm's branches: an independent trunk as well
            branches = ref(x)[1:]
            want = torch.cat([F.interpolate(b, size=branches[0].shape[-2:], mode="bilinear", align_corners=False)
                              for b in branches], dim=1)
            dense = hrnet.create_model(SMALL, checkpoint=path, features_only=True, feature_location="hrnetv2").eval()
            assert rel_err(dense(x)[0], want) < 1e-5


@pytest.mark.slow
def test_backbone_only_file_loads_into_the_dense_extractor(tmp_path):
    classifier = randomize(hrnet.create_model(SMALL), seed=42)
    path = write_checkpoint(classifier, tmp_path / "backbone.pth", format="official", backbone_only=True)
    dense = hrnet.create_model(SMALL, checkpoint=path, features_only=True, feature_location="hrnetv2")
    trunk = {k: v for k, v in classifier.state_dict().items() if k in dense.state_dict()}
    assert trunk.keys() == dense.state_dict().keys()
    assert all(torch.equal(dense.state_dict()[k], v) for k, v in trunk.items())


@pytest.mark.slow
def test_segmentation_example_runs_and_prints_miou(tmp_path):
    checkpoint = tmp_path / "small.safetensors"
    save_checkpoint(randomize(hrnet.create_model(SMALL), seed=43), checkpoint)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "segmentation.py"), "--epochs", "1",
                           "--train-size", "32", "--test-size", "16", "--checkpoint", str(checkpoint)],
                          env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"from {checkpoint}" in proc.stdout
    match = re.search(r"^mIoU (\d\.\d{4}), pixel accuracy (\d\.\d{4}) on 16 held-out canvases", proc.stdout, re.M)
    assert match and 0 <= float(match[1]) <= 1
    assert list(tmp_path.iterdir()) == [checkpoint]  # the data lives in memory
