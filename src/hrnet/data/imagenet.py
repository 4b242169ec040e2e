"""Names for a classifier's outputs; the ImageNet-1k table itself lives with the zoo models
(:mod:`hrnet.models.imagenet`) and is re-exported here."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..models.imagenet import imagenet_names, imagenet_wnids

__all__ = ["class_names", "imagenet_names", "imagenet_wnids"]


def class_names(model: Any, names: Sequence[str] | None = None) -> list[str]:
    """The name of each of a classifier's outputs, index by index: THE rule every output uses.

    ``model`` is a model (anything with ``num_classes`` and, optionally, ``class_names``) or a class
    count. In order: ``names`` if given, the model's own ``class_names`` if it has them, the ImageNet
    names for 1000 classes, else the indices ``"0"``, ``"1"``... Given names must be one per class.
    """
    count = model if isinstance(model, int) else int(model.num_classes)
    if names is None and not isinstance(model, int):
        names = getattr(model, "class_names", None)
    if names is not None:
        if len(names) != count:
            raise ValueError(f"{len(names)} class names for {count} classes")
        return list(names)
    return list(imagenet_names()) if count == 1000 else [str(i) for i in range(count)]
