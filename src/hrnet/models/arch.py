"""The architecture table: one frozen record per HRNet-C variant.

Each stage is one row: modules, block type, blocks per branch, branch widths (the block's
``planes``; a Bottleneck outputs 4x that). This mirrors the compact table of the HRNet paper
and mmpretrain's configs, and is the single source the modules are built from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

BlockType = Literal["basic", "bottleneck"]
EXPANSION = {"basic": 1, "bottleneck": 4}


@dataclass(frozen=True)
class Stage:
    modules: int
    block: BlockType
    blocks: int  # per branch
    widths: tuple[int, ...]  # one per branch: the block's planes

    @property
    def branches(self) -> int:
        return len(self.widths)

    @property
    def out_channels(self) -> tuple[int, ...]:
        return tuple(w * EXPANSION[self.block] for w in self.widths)


@dataclass(frozen=True)
class Arch:
    """An HRNet-C classifier: stem, four stages, the "incre" classification head."""

    name: str
    stages: tuple[Stage, Stage, Stage, Stage]
    stem_width: int = 64
    head_widths: tuple[int, ...] = (32, 64, 128, 256)  # incre Bottleneck planes (x4 = 128..1024)
    num_features: int = 2048

    def __post_init__(self) -> None:
        if len(self.stages) != 4:
            raise ValueError(f"{self.name}: HRNet-C has 4 stages, got {len(self.stages)}")
        for i, stage in enumerate(self.stages):
            if stage.branches != i + 1:
                raise ValueError(f"{self.name}: stage {i + 1} must have {i + 1} branches, got {stage.branches}")

    @property
    def width(self) -> int:
        return self.stages[1].widths[0]

    @property
    def branch_channels(self) -> tuple[int, ...]:
        return self.stages[3].out_channels

    @property
    def incre_channels(self) -> tuple[int, ...]:
        return tuple(4 * w for w in self.head_widths)


def _ladder(c: int, n: int) -> tuple[int, ...]:
    return tuple(c * 2**i for i in range(n))


def hrnet_c(width: int) -> Arch:
    """The standard HRNet-C of the paper: stage modules 1/1/4/3, four blocks per branch."""
    return Arch(
        name=f"w{width}",
        stages=(
            Stage(1, "bottleneck", 4, (64,)),
            Stage(1, "basic", 4, _ladder(width, 2)),
            Stage(4, "basic", 4, _ladder(width, 3)),
            Stage(3, "basic", 4, _ladder(width, 4)),
        ),
    )


ARCHS: dict[str, Arch] = {f"w{w}": hrnet_c(w) for w in (18, 30, 32, 40, 44, 48, 64)}
ARCHS["w18-small"] = Arch(
    name="w18-small",
    stages=(
        Stage(1, "bottleneck", 1, (32,)),
        Stage(1, "basic", 2, _ladder(16, 2)),
        Stage(1, "basic", 2, _ladder(16, 3)),
        Stage(1, "basic", 2, _ladder(16, 4)),
    ),
)
ARCHS["w18-small-v2"] = Arch(
    name="w18-small-v2",
    stages=(
        Stage(1, "bottleneck", 2, (64,)),
        Stage(1, "basic", 2, _ladder(18, 2)),
        Stage(3, "basic", 2, _ladder(18, 3)),
        Stage(2, "basic", 2, _ladder(18, 4)),
    ),
)
