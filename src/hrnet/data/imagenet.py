"""The 1000 ImageNet-1k classes: WordNet ids in index order and their human-readable names.

Shipped as package data (``imagenet_classes.txt``, from timm's ``imagenet_synsets.txt`` and
``imagenet_synset_to_lemma.txt``) so no private module of another package is imported at run time.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files


@cache
def _table() -> tuple[tuple[str, ...], tuple[str, ...]]:
    lines = files(__package__).joinpath("imagenet_classes.txt").read_text(encoding="utf-8").splitlines()
    wnids, names = zip(*(line.split("\t", 1) for line in lines))
    return wnids, names


def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 WordNet ids, sorted: the position of a wnid is its class index."""
    return _table()[0]


def imagenet_names() -> tuple[str, ...]:
    """The human-readable name of each class index, e.g. ``'tench, Tinca tinca'`` for 0."""
    return _table()[1]


def class_names(num_classes: int) -> list[str]:
    """Names for a classifier's outputs: the ImageNet names for 1000 classes, the index otherwise."""
    return list(imagenet_names()) if num_classes == 1000 else [str(i) for i in range(num_classes)]
