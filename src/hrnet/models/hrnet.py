"""HRNet-C: a shared trunk with two heads, the classifier and the multi-resolution feature extractor.

Module names follow the official HRNet-Image-Classification layout (also timm's), so those
state dicts load by name. The head convs carry no bias (the mmcls layout): a bias before
BatchNorm is redundant, and official/timm biases fold exactly into BN's running mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .arch import EXPANSION, Arch, Stage
from .zoo import EvalConfig, ModelRecord

BN_MOMENTUM = 0.1
FeatureLocation = Literal["incre", "", "hrnetv2"]
FEATURE_LOCATIONS = ("incre", "", "hrnetv2")


def conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1, relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(cout, momentum=BN_MOMENTUM),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes, momentum=BN_MOMENTUM)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, momentum=BN_MOMENTUM)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        return self.relu(x + shortcut)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes, momentum=BN_MOMENTUM)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, momentum=BN_MOMENTUM)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4, momentum=BN_MOMENTUM)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))
        return self.relu(x + shortcut)


BLOCKS: dict[str, type[BasicBlock] | type[Bottleneck]] = {"basic": BasicBlock, "bottleneck": Bottleneck}


def make_layer(block: str, inplanes: int, planes: int, blocks: int) -> nn.Sequential:
    """A residual stack; the first block gets a 1x1 projection when the width changes."""
    cls = BLOCKS[block]
    out = planes * cls.expansion
    downsample = conv_bn(inplanes, out, kernel=1, relu=False) if inplanes != out else None
    layers = [cls(inplanes, planes, downsample=downsample)]
    layers += [cls(out, planes) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def fuse_up(cin: int, cout: int, factor: int) -> nn.Sequential:
    """Lower resolution j to higher resolution i: 1x1 conv + BN, then nearest upsample x2^(j-i)."""
    return nn.Sequential(*conv_bn(cin, cout, kernel=1, relu=False), nn.Upsample(scale_factor=factor, mode="nearest"))


def fuse_down(cin: int, cout: int, steps: int) -> nn.Sequential:
    """Higher resolution j to lower resolution i: a chain of stride-2 3x3 convs, ReLU between."""
    chain = [conv_bn(cin, cin, stride=2) for _ in range(steps - 1)]
    chain.append(conv_bn(cin, cout, stride=2, relu=False))
    return nn.Sequential(*chain)


def crop_like(z: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``z`` cropped to ``ref``'s height and width. For an input not divisible by 32, stride-2 convs
    round sizes up, so x2^k nearest upsampling overshoots by a row/column; cropping keeps positions
    aligned (and is a no-op for multiples of 32)."""
    return z if z.shape[-2:] == ref.shape[-2:] else z[..., :ref.shape[-2], :ref.shape[-1]]


class HRModule(nn.Module):
    """Parallel branches followed by all-to-all fusion of their resolutions."""

    def __init__(self, stage: Stage, in_channels: tuple[int, ...]):
        super().__init__()
        out = stage.out_channels
        self.branches = nn.ModuleList(
            make_layer(stage.block, cin, w, stage.blocks) for cin, w in zip(in_channels, stage.widths)
        )
        n = stage.branches
        self.fuse_layers = nn.ModuleList(
            nn.ModuleList(
                fuse_up(out[j], out[i], 2 ** (j - i)) if j > i
                else nn.Identity() if j == i
                else fuse_down(out[j], out[i], i - j)
                for j in range(n)
            )
            for i in range(n)
        ) if n > 1 else nn.ModuleList()
        self.relu = nn.ReLU(inplace=False)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        xs = [branch(x) for branch, x in zip(self.branches, xs)]
        if not self.fuse_layers:
            return xs
        fused = []
        for i, fuse in enumerate(self.fuse_layers):
            y = crop_like(fuse[0](xs[0]), xs[i])
            for f, x in zip(fuse[1:], xs[1:]):
                y = y + crop_like(f(x), xs[i])
            fused.append(self.relu(y))
        return fused


class StageSequence(nn.Sequential):
    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:  # type: ignore[override]
        for module in self:
            xs = module(xs)
        return xs


def make_transition(prev: tuple[int, ...], cur: tuple[int, ...]) -> nn.ModuleList:
    """Keep (or re-width) existing branches; each new branch is a stride-2 conv of the last one."""
    layers: list[nn.Module] = []
    for i, c in enumerate(cur):
        if i < len(prev):
            layers.append(nn.Identity() if prev[i] == c else conv_bn(prev[i], c))
        else:
            layers.append(nn.Sequential(*[conv_bn(prev[-1], c if k == i - len(prev) else prev[-1], stride=2)
                                          for k in range(i + 1 - len(prev))]))
    return nn.ModuleList(layers)


class GlobalAvgPool(nn.Module):
    """Mean over H and W; exports to ONNX with any input size (no data-dependent kernel)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3))


@dataclass(frozen=True)
class FeatureInfo:
    """One output map of a feature extractor (or one level of the classifier's head).

    ``index`` is its level, stride ``2 ** (index + 1)``: 0 the stride-2 stem, 1..4 strides 4..32.
    ``module`` names a module of the model (``dict(model.named_modules())`` has it) whose forward
    computes the map: ``bn1`` (the stem, before the ReLU that follows it in place), ``incre_modules.i``,
    ``stage4`` (its output is the list of the four branches; this map is item ``index - 1``) or
    ``resize_concat``.
    """

    index: int
    channels: int
    stride: int
    module: str


class FeatureInfoList(list[FeatureInfo]):
    """``model.feature_info``: a list of :class:`FeatureInfo`, one per output map, with timm's accessors.

    ``channels()``, ``reduction()`` and ``module_name()`` return a list over the outputs, or with
    ``idx`` (an int or a sequence of ints, positions in this list) one value or a list of them.
    """

    def _get(self, attr: str, idx: int | Sequence[int] | None):
        if idx is None:
            return [getattr(f, attr) for f in self]
        if isinstance(idx, int):
            return getattr(self[idx], attr)
        return [getattr(self[i], attr) for i in idx]

    def channels(self, idx: int | Sequence[int] | None = None) -> int | list[int]:
        return self._get("channels", idx)

    def reduction(self, idx: int | Sequence[int] | None = None) -> int | list[int]:
        return self._get("stride", idx)

    def module_name(self, idx: int | Sequence[int] | None = None) -> str | list[str]:
        return self._get("module", idx)


class HRNetTrunk(nn.Module):
    """The part every HRNet shares: the stem, stage 1, the transitions and stages 2-4, ending in
    four parallel branches (C, 2C, 4C, 8C channels at strides 4..32).

    The classifier (:class:`HRNet`) and the feature extractor (:class:`HRNetFeatures`) are its two
    heads. Every model carries ``eval_cfg``, the preprocessing it is evaluated with (the default
    ImageNet one until weights that say otherwise are loaded), and ``pretrained_cfg``, the zoo record
    of its published weights or None.
    """

    def __init__(self, arch: Arch, in_chans: int = 3):
        super().__init__()
        self.arch = arch
        self.eval_cfg = EvalConfig()
        self.pretrained_cfg: ModelRecord | None = None
        self.conv1 = nn.Conv2d(in_chans, arch.stem_width, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(arch.stem_width, momentum=BN_MOMENTUM)
        self.conv2 = nn.Conv2d(arch.stem_width, 64, 3, 2, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(64, momentum=BN_MOMENTUM)
        self.relu = nn.ReLU(inplace=True)

        s1 = arch.stages[0]
        self.layer1 = make_layer(s1.block, 64, s1.widths[0], s1.blocks)
        channels = s1.out_channels
        for n, stage in enumerate(arch.stages[1:], start=2):
            setattr(self, f"transition{n - 1}", make_transition(channels, stage.out_channels))
            # transitions already bring every branch to the stage's width
            setattr(self, f"stage{n}", StageSequence(*(HRModule(stage, stage.out_channels) for _ in range(stage.modules))))
            channels = stage.out_channels

    def init_weights(self) -> None:
        if self.conv1.weight.is_meta:  # built for its shapes only; meta-device init is slow and pointless
            return
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def stem(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (stride-2 features, stride-4 features)."""
        s2 = self.relu(self.bn1(self.conv1(x)))
        return s2, self.relu(self.bn2(self.conv2(s2)))

    def branches(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The four parallel branches (C, 2C, 4C, 8C channels at strides 4..32) from stride-4 stem features."""
        xs = [self.layer1(x)]
        for n in (2, 3, 4):
            transition = getattr(self, f"transition{n - 1}")
            xs = [t(xs[i] if i < len(xs) else xs[-1]) for i, t in enumerate(transition)]
            xs = getattr(self, f"stage{n}")(xs)
        return xs


def make_incre(arch: Arch) -> nn.ModuleList:
    """The head's first part: one Bottleneck per branch, to 128/256/512/1024 channels."""
    return nn.ModuleList(make_layer("bottleneck", c, w, 1) for c, w in zip(arch.branch_channels, arch.head_widths))


class HRNet(HRNetTrunk):
    """HRNet-C, the classifier: the trunk, then the "incre" head (as mmpretrain's ``HRFuseScales``
    neck): each branch widened by a Bottleneck, summed from high to low resolution through stride-2
    convs, a 1x1 conv to ``num_features``, global average pooling and a Linear classifier.

    ``class_names`` names the classifier's outputs, index by index (folder names of the data it was
    trained on, ImageNet's for the zoo), or is None where no names are known; it travels with the
    weights (:func:`~hrnet.save_checkpoint`, ``create_model(checkpoint=...)``)."""

    def __init__(self, arch: Arch, num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0):
        super().__init__(arch, in_chans)
        self.class_names: tuple[str, ...] | None = None
        incre = arch.incre_channels
        self.incre_modules = make_incre(arch)
        self.downsamp_modules = nn.ModuleList(conv_bn(incre[i], incre[i + 1], stride=2) for i in range(len(incre) - 1))
        self.final_layer = conv_bn(incre[-1], arch.num_features, kernel=1)
        self.num_features = arch.num_features
        self.global_pool = GlobalAvgPool()
        self.drop_rate = drop_rate
        self.num_classes = num_classes
        self.classifier = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        self.feature_info = FeatureInfoList([FeatureInfo(0, arch.stem_width, 2, "bn1")] + [
            FeatureInfo(i + 1, c, 4 * 2**i, f"incre_modules.{i}") for i, c in enumerate(incre)])
        self.init_weights()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The ``num_features``-channel stride-32 map that the classifier pools."""
        xs = self.branches(self.stem(x)[1])
        y = self.incre_modules[0](xs[0])
        for incre, down, x_i in zip(self.incre_modules[1:], self.downsamp_modules, xs[1:]):
            y = incre(x_i) + down(y)
        return self.final_layer(y)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate > 0.0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int, class_names: Sequence[str] | None = None) -> None:
        """Replace the Linear layer (``num_classes=0`` leaves the pooled features as output). A new head
        has new classes: ``class_names`` (one per class) names them, else none are known (None)."""
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        self.class_names = tuple(class_names) if class_names is not None else None
        self.num_classes = num_classes
        ref = self.final_layer[0].weight
        self.classifier = (nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
                           if num_classes else nn.Identity())


class ResizeConcat(nn.Module):
    """The HRNetV2 representation (mmsegmentation's ``input_transform="resize_concat"``): every branch
    resized to branch 0's size (bilinear, ``align_corners=False``) and concatenated on channels.
    Resizing to a size, not by a factor of 2^k, keeps it right for inputs not divisible by 32."""

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        size = xs[0].shape[-2:]
        return torch.cat([xs[0]] + [F.interpolate(x, size=size, mode="bilinear", align_corners=False)
                                    for x in xs[1:]], dim=1)


def feature_indices(feature_location: str, out_indices: Sequence[int] | None) -> tuple[int, ...]:
    """The checked, sorted ``out_indices`` for ``feature_location`` (None: every level but the stem).

    "incre" and "" have levels 0..4 (stem, strides 4..32); "hrnetv2" has 0 (stem) and 1 (the
    concatenated branches at stride 4). Raises ValueError naming the allowed values.
    """
    if feature_location not in FEATURE_LOCATIONS:
        raise ValueError(f"feature_location must be one of 'incre', '', 'hrnetv2', got {feature_location!r}")
    levels = 2 if feature_location == "hrnetv2" else 5
    if out_indices is None:
        return tuple(range(1, levels))
    out_indices = tuple(out_indices)
    if not out_indices or any(i not in range(levels) for i in out_indices) or len(set(out_indices)) != len(out_indices):
        what = "0 (stem) and 1 (the concatenated branches)" if levels == 2 else "0..4"
        raise ValueError(f"out_indices for feature_location={feature_location!r} must be distinct values in "
                         f"{what}, got {out_indices}")
    return tuple(sorted(out_indices))


class HRNetFeatures(HRNetTrunk):
    """Multi-resolution feature extractor: returns a list of maps, one per ``out_indices`` entry (sorted).

    ``feature_location="incre"`` gives the head's 128/256/512/1024-channel maps; ``""`` the raw
    branches (C, 2C, 4C, 8C); for both, index 0 is the stride-2 stem and 1..4 are strides 4..32
    (default ``(1, 2, 3, 4)``). ``"hrnetv2"`` gives the dense-prediction representation, the four
    branches resized to stride 4 and concatenated (15C channels: 270 for W18); index 0 is the stem,
    1 that map (default ``(1,)``, a one-map list). The state dict is the trunk's (plus the incre
    modules for "incre"), so backbone checkpoints load into every location.
    """

    def __init__(self, arch: Arch, in_chans: int = 3, out_indices: Sequence[int] | None = None,
                 feature_location: FeatureLocation = "incre"):
        indices = feature_indices(feature_location, out_indices)  # refuse before building
        super().__init__(arch, in_chans)
        self.out_indices = indices
        self.feature_location = feature_location
        self.incre_modules = make_incre(arch) if feature_location == "incre" else None
        self.resize_concat = ResizeConcat() if feature_location == "hrnetv2" else None
        info = [FeatureInfo(0, arch.stem_width, 2, "bn1")]
        if feature_location == "hrnetv2":
            info.append(FeatureInfo(1, sum(arch.branch_channels), 4, "resize_concat"))
        elif feature_location == "incre":
            info += [FeatureInfo(i + 1, c, 4 * 2**i, f"incre_modules.{i}") for i, c in enumerate(arch.incre_channels)]
        else:
            info += [FeatureInfo(i + 1, c, 4 * 2**i, "stage4") for i, c in enumerate(arch.branch_channels)]
        self.feature_info = FeatureInfoList(f for f in info if f.index in self.out_indices)
        self.init_weights()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        s2, s4 = self.stem(x)
        xs = self.branches(s4)
        if self.incre_modules is not None:
            xs = [incre(f) for incre, f in zip(self.incre_modules, xs)]
        elif self.resize_concat is not None:
            xs = [self.resize_concat(xs)]
        feats = [s2, *xs]
        return [feats[i] for i in self.out_indices]
