"""The model zoo: one frozen record per named model, and name resolution.

A record is the single source of truth for a model: the CLI table, the evaluation transform, the
download and the tests all read it. Figures for the seven seed widths and the two ssld models
are the MMClassification model zoo's; params/FLOPs are exact integers in its counting convention
(see :mod:`hrnet.models.flops`).
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass
from typing import Literal

from ..errors import UnknownModelError
from .arch import ARCHS, Arch

IMAGENET_MEAN = (123.675, 116.28, 103.53)  # on 0..255 pixel values
IMAGENET_STD = (58.395, 57.12, 57.375)
MMCLS_BASE = "https://download.openmmlab.com/mmclassification/v0/hrnet/"
HF_BASE = "https://huggingface.co/timm/{}/resolve/main/model.safetensors"


Interpolation = Literal["bilinear", "bicubic", "nearest"]


@dataclass(frozen=True)
class EvalConfig:
    """How a model is evaluated: resize the short edge to ``resize_size`` (the long edge truncated)
    with ``interpolation``, centre-crop ``input_size``, normalise with ``mean``/``std`` on 0..255 values.
    The defaults are the mmcls ImageNet pipeline the zoo's accuracy was measured with."""

    input_size: int = 224
    resize_size: int = 256
    interpolation: Interpolation = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.interpolation not in typing.get_args(Interpolation):
            raise ValueError(f"interpolation must be one of {', '.join(typing.get_args(Interpolation))}, "
                             f"got {self.interpolation!r}")

    @property
    def crop_pct(self) -> float:
        return self.input_size / self.resize_size

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "crop_pct": self.crop_pct}

    @classmethod
    def from_dict(cls, d: dict) -> EvalConfig:
        """The inverse of :meth:`to_dict` (``crop_pct`` is derived, so ignored); unknown keys are an error."""
        d = {k: v for k, v in d.items() if k != "crop_pct"}
        for key in ("mean", "std"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


@dataclass(frozen=True)
class ModelRecord:
    """Published weights: where they are (``url``, and ``sha256_prefix``, the hash prefix the file name
    carries, None where none was published), what they score, and how they were evaluated."""

    name: str
    arch: Arch
    url: str
    sha256_prefix: str | None
    top1: float
    top5: float
    params: int | None  # exact published count (mmcls convention); None where none was published
    flops: int | None
    source: str
    license: str
    aliases: tuple[str, ...] = ()
    num_classes: int = 1000
    eval: EvalConfig = EvalConfig()

    @property
    def filename(self) -> str:
        """The cache file name. Hub URLs all end in model.safetensors, so those take the repo name."""
        if self.url.startswith("https://huggingface.co/"):
            return self.url.split("/")[4] + ".safetensors"
        return self.url.rsplit("/", 1)[-1]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["arch"] = self.arch.name
        d["filename"] = self.filename
        d["eval"] = self.eval.to_dict()
        return d


def _seed(width: int, ssld: bool, sha: str, params: int, flops: int, top1: float, top5: float) -> ModelRecord:
    mm = f"hrnet-w{width}_3rdparty_8xb32{'-ssld' if ssld else ''}_in1k"
    timm_names = (f"hrnet_w{width}_ssld", f"hrnet_w{width}_ssld.paddle_in1k") if ssld else \
        (f"hrnet_w{width}", f"hrnet_w{width}.ms_in1k")
    return ModelRecord(
        name=f"hrnet-w{width}{'-ssld' if ssld else ''}",
        arch=ARCHS[f"w{width}"],
        url=f"{MMCLS_BASE}{mm}_20220120-{sha}.pth", sha256_prefix=sha,
        top1=top1, top5=top5, params=params, flops=flops,
        source=("PaddleClas SSLD distillation, converted by MMClassification" if ssld
                else "HRNet/HRNet-Image-Classification, converted by MMClassification"),
        license="Apache-2.0" if ssld else "MIT",
        aliases=(mm, *timm_names),
    )


_RECORDS = [
    _seed(18, False, "0c10b180", 21_295_164, 4_330_397_932, 76.75, 93.44),
    _seed(30, False, "8aa3832f", 37_708_380, 8_168_305_684, 78.19, 94.22),
    _seed(32, False, "c394f1ab", 41_228_840, 8_986_267_584, 78.44, 94.19),
    _seed(40, False, "9a2dbfc5", 57_553_320, 12_767_574_064, 78.94, 94.47),
    _seed(44, False, "35d07f73", 67_061_144, 14_963_902_632, 78.88, 94.37),
    _seed(48, False, "e555ef50", 77_466_024, 17_364_014_752, 79.32, 94.52),
    _seed(64, False, "19126642", 128_056_104, 29_002_298_752, 79.46, 94.65),
    _seed(18, True, "455f69ea", 21_295_164, 4_330_397_932, 81.06, 95.70),
    _seed(48, True, "d0459c38", 77_466_024, 17_364_014_752, 83.63, 96.79),
    # The small variants are not in the seed: weights from timm's hub copy of the official files,
    # accuracy from the official README (top-1 error 27.7% / 24.9%, top-5 error 9.3% / 7.6%).
    ModelRecord(
        name="hrnet-w18-small", arch=ARCHS["w18-small"], url=HF_BASE.format("hrnet_w18_small.ms_in1k"),
        sha256_prefix=None,
        top1=72.3, top5=90.7, params=None, flops=None,
        source="HRNet/HRNet-Image-Classification, via timm's hub copy", license="MIT",
        aliases=("hrnet_w18_small", "hrnet_w18_small.ms_in1k"),
    ),
    ModelRecord(
        name="hrnet-w18-small-v2", arch=ARCHS["w18-small-v2"], url=HF_BASE.format("hrnet_w18_small_v2.ms_in1k"),
        sha256_prefix=None,
        top1=75.1, top5=92.4, params=None, flops=None,
        source="HRNet/HRNet-Image-Classification, via timm's hub copy", license="MIT",
        aliases=("hrnet_w18_small_v2", "hrnet_w18_small_v2.ms_in1k"),
    ),
]
MODELS: dict[str, ModelRecord] = {r.name: r for r in _RECORDS}


def _key(name: str) -> str:
    return name.strip().lower().replace("_", "-")


_LOOKUP: dict[str, str] = {}
for _r in _RECORDS:
    for _n in (_r.name, *_r.aliases):
        _LOOKUP[_key(_n)] = _r.name


def resolve(name: str) -> ModelRecord:
    """The record for a canonical name or any alias (timm's, mmcls's), case-insensitively."""
    canonical = _LOOKUP.get(_key(name))
    if canonical is None:
        if _key(name) in ARCHS:
            raise UnknownModelError(f"{name!r} is an architecture without published weights; "
                                    "pass a checkpoint, or one of: " + ", ".join(models_of(ARCHS[_key(name)])))
        close = difflib.get_close_matches(_key(name), [*_LOOKUP, *ARCHS], n=3, cutoff=0.5)
        hint = ", ".join(dict.fromkeys(_LOOKUP.get(c, c) for c in close)) or ", ".join(MODELS)
        raise UnknownModelError(f"unknown model {name!r}; did you mean: {hint}?")
    return MODELS[canonical]


def resolve_arch(name: str) -> tuple[Arch, ModelRecord | None]:
    """A zoo name or alias (its architecture and weights record), or a bare architecture name of
    :data:`~hrnet.models.arch.ARCHS` such as ``w18`` (no weights record)."""
    arch = ARCHS.get(_key(name))
    if arch is not None and _key(name) not in _LOOKUP:
        return arch, None
    record = resolve(name)
    return record.arch, record


def models_of(arch: Arch) -> list[str]:
    """The zoo names built on ``arch``."""
    return [r.name for r in MODELS.values() if r.arch == arch]
