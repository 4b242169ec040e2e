"""The 1000 ImageNet-1k classes the zoo's classifiers predict: WordNet ids in index order and their
human-readable names.

Shipped as package data (``imagenet_classes.txt``, from timm's ``imagenet_synsets.txt`` and
``imagenet_synset_to_lemma.txt``) so no private module of another package is imported at run time.
It lives with the models (not :mod:`hrnet.data`) because the names are part of the zoo models: the
builder gives them to a zoo model and the weights writers put them in the files they write.
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
