"""The model zoo: every model builds, trains, and matches the seed's exact figures and timm's outputs."""

from __future__ import annotations

import json

import pytest
import timm
import torch

import hrnet
from hrnet.models import MODELS, HRNet, count_flops, count_params, resolve
from helpers import randomize, rel_err

# REFERENCE.md §1: exact params and FLOPs of the mmcls counter at 1x3x224x224 (not computed by hrnet).
SEED_EXACT = {
    "hrnet-w18": (21_295_164, 4_330_397_932),
    "hrnet-w30": (37_708_380, 8_168_305_684),
    "hrnet-w32": (41_228_840, 8_986_267_584),
    "hrnet-w40": (57_553_320, 12_767_574_064),
    "hrnet-w44": (67_061_144, 14_963_902_632),
    "hrnet-w48": (77_466_024, 17_364_014_752),
    "hrnet-w64": (128_056_104, 29_002_298_752),
}
ALL = hrnet.list_models()
FAST = {"hrnet-w18", "hrnet-w18-small", "hrnet-w18-small-v2"}  # what the fast tier (make test-fast) covers


def tiered(names: list[str]) -> list:
    """``names`` as parameters, the wider models marked slow: the fast tier keeps the W18 family."""
    return [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in names]


def test_list_models_is_the_seed_table_then_the_small_variants():
    assert ALL == [*SEED_EXACT, "hrnet-w18-ssld", "hrnet-w48-ssld", "hrnet-w18-small", "hrnet-w18-small-v2"]


@pytest.mark.parametrize("name", tiered(ALL))
def test_forward_backward_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    model = hrnet.create_model(name, num_classes=7)
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert model.num_features == 2048
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 2048)


@pytest.mark.parametrize("name", tiered(ALL))
@pytest.mark.parametrize("location", ["incre", ""])
def test_features_only_outputs_agree_with_feature_info(name, location):
    model = hrnet.create_model(name, features_only=True, out_indices=(0, 1, 2, 3, 4), feature_location=location)
    width = resolve(name).arch.width
    expected = [64, 128, 256, 512, 1024] if location == "incre" else [64, width, 2 * width, 4 * width, 8 * width]
    assert [f.channels for f in model.feature_info] == expected
    assert [f.stride for f in model.feature_info] == [2, 4, 8, 16, 32]
    feats = model.eval()(torch.randn(1, 3, 96, 128))
    assert [(f.shape[1], 96 // f.shape[2], 128 // f.shape[3]) for f in feats] == \
        [(i.channels, i.stride, i.stride) for i in model.feature_info]


@pytest.mark.parametrize("location", ["incre", ""])
def test_any_input_size_runs_with_strides_rounded_up(location):
    # timm and the official code fail here: 100/32 is not whole, nearest upsampling overshoots.
    model = hrnet.create_model("hrnet-w18-small", features_only=True, out_indices=(0, 1, 2, 3, 4),
                               feature_location=location).eval()
    feats = model(torch.randn(1, 3, 100, 150))
    assert [tuple(f.shape[2:]) for f in feats] == [(50, 75), (25, 38), (13, 19), (7, 10), (4, 5)]
    assert hrnet.create_model("hrnet-w18-small").eval()(torch.randn(1, 3, 100, 150)).shape == (1, 1000)


def test_out_indices_select_and_order_the_features():
    model = hrnet.create_model("hrnet-w18-small", features_only=True, out_indices=(4, 2))
    feats = model.eval()(torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == [256, 1024] == [i.channels for i in model.feature_info]
    with pytest.raises(ValueError, match="out_indices"):
        hrnet.create_model("hrnet-w18", features_only=True, out_indices=(5,))


@pytest.mark.parametrize("name", tiered(list(SEED_EXACT)))
def test_params_and_flops_equal_the_seed_exact_integers(name):
    model = hrnet.create_model(name)
    assert (count_params(model), count_flops(model)) == SEED_EXACT[name]
    record = resolve(name)
    assert (record.params, record.flops) == SEED_EXACT[name]


def test_ssld_records_share_their_architecture_figures():
    assert (resolve("hrnet-w18-ssld").params, resolve("hrnet-w18-ssld").flops) == SEED_EXACT["hrnet-w18"]
    assert (resolve("hrnet-w48-ssld").params, resolve("hrnet-w48-ssld").flops) == SEED_EXACT["hrnet-w48"]


def test_flops_scale_with_input_size():
    model = hrnet.create_model("hrnet-w18")
    # every op of the counter is per output (or input) position: 448x448 has 4x the positions.
    assert count_flops(model, (448, 448)) == 4 * SEED_EXACT["hrnet-w18"][1]


@pytest.mark.parametrize("name,official_m", [("hrnet-w18-small", 13.2), ("hrnet-w18-small-v2", 15.6)])
def test_small_variants_match_the_official_parameter_counts(name, official_m):
    # The official count includes the 3840 head-conv biases (256+512+1024+2048) that we fold away.
    assert round((count_params(hrnet.create_model(name)) + 3840) / 1e6, 1) == official_m


@pytest.mark.parametrize("name,size", [pytest.param("hrnet-w18", 224, marks=pytest.mark.slow),
                                       pytest.param("hrnet-w32", 160, marks=pytest.mark.slow),
                                       pytest.param("hrnet-w64", 128, marks=pytest.mark.slow),
                                       ("hrnet-w18-small-v2", 160)])
def test_logits_and_features_equal_timm(name, size):
    timm_name = resolve(name).aliases[-1] if "small" in name else resolve(name).aliases[1]
    torch.manual_seed(0)
    ref = timm.create_model(timm_name.split(".")[0], head_conv_bias=False).eval()
    randomize(ref)
    ours = hrnet.create_model(name).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert rel_err(ours(x), ref(x)) < 1e-5
        for location in ("incre", ""):
            ref_f = timm.create_model(timm_name.split(".")[0], features_only=True, feature_location=location,
                                      head_conv_bias=False).eval()
            ref_f.load_state_dict(ref.state_dict(), strict=False)
            ours_f = hrnet.create_model(name, features_only=True, out_indices=(0, 1, 2, 3, 4),
                                        feature_location=location).eval()
            ours_f.load_state_dict(ref.state_dict(), strict=False)
            for a, b in zip(ours_f(x), ref_f(x), strict=True):
                assert a.shape == b.shape and rel_err(a, b) < 1e-5


@pytest.mark.parametrize("alias", ["hrnet_w18", "HRNet_W18.ms_in1k", "hrnet-w18_3rdparty_8xb32_in1k", "HRNET-W18"])
def test_aliases_resolve_case_insensitively(alias):
    assert resolve(alias).name == "hrnet-w18"


def test_ssld_aliases():
    assert resolve("hrnet_w48_ssld").name == resolve("hrnet_w48_ssld.paddle_in1k").name == "hrnet-w48-ssld"
    assert resolve("hrnet-w48_3rdparty_8xb32-ssld_in1k").name == "hrnet-w48-ssld"


def test_unknown_name_suggests_the_closest():
    with pytest.raises(hrnet.UnknownModelError, match="hrnet-w48") as e:
        hrnet.create_model("hrnet-w84")
    assert "\n" not in str(e.value)


def test_conflicting_options_fail_before_any_download(monkeypatch):
    monkeypatch.setenv("HRNET_OFFLINE", "1")  # a fetch would raise a DownloadError instead
    with pytest.raises(TypeError, match="num_classes"):
        hrnet.create_model("hrnet-w18", pretrained=True, features_only=True, num_classes=3)
    with pytest.raises(TypeError, match="features_only"):
        hrnet.create_model("hrnet-w18", pretrained=True, out_indices=(1, 2))


def test_unknown_keyword_raises_type_error():
    with pytest.raises(TypeError):
        hrnet.create_model("hrnet-w18", num_clases=10)
    with pytest.raises(TypeError):
        hrnet.create_model("hrnet-w18", out_indices=(1, 2))


def test_records_carry_the_hash_prefix_of_their_file_name():
    for record in MODELS.values():
        if record.url.startswith("https://download.openmmlab.com/"):
            assert record.filename.endswith(f"_20220120-{record.sha256_prefix}.pth")
            assert len(record.sha256_prefix) == 8
    assert resolve("hrnet-w18").sha256_prefix == "0c10b180"
    assert resolve("hrnet-w48-ssld").sha256_prefix == "d0459c38"


def test_model_info_is_plain_json():
    info = hrnet.get_model_info("hrnet_w18_ssld")
    assert json.loads(json.dumps(info))["name"] == "hrnet-w18-ssld"
    assert info["top1"] == 81.06 and info["top5"] == 95.70
    assert info["eval"]["resize_size"] == 256 and info["eval"]["input_size"] == 224


def test_reset_classifier():
    model = hrnet.create_model("hrnet-w18-small")
    model.reset_classifier(3)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 2048)
    assert isinstance(model, HRNet) and model.num_classes == 0
