"""The public builders: ``list_models``, ``get_model_info``, ``create_model``."""

from __future__ import annotations

import os

from torch import nn

from .hrnet import FeatureLocation, HRNet, HRNetFeatures
from .zoo import MODELS, resolve


def list_models() -> list[str]:
    """The canonical model names, seed table first."""
    return list(MODELS)


def get_model_info(name: str) -> dict:
    """The zoo record of ``name`` (any alias) as a plain dict."""
    return resolve(name).to_dict()


def create_model(
    name: str,
    *,
    pretrained: bool = False,
    checkpoint: str | os.PathLike | None = None,
    num_classes: int | None = None,
    drop_rate: float = 0.0,
    features_only: bool = False,
    out_indices: tuple[int, ...] | None = None,
    feature_location: FeatureLocation = "incre",
    progress: bool = True,
) -> nn.Module:
    """Build an HRNet classifier, or with ``features_only=True`` its multi-resolution extractor.

    ``pretrained=True`` loads the record's published weights (downloaded once into the cache);
    ``checkpoint`` loads a local file, directory or URL in any supported format instead.
    ``num_classes`` replaces the classifier (pretrained weights then load all but the classifier);
    without it, a ``checkpoint``'s own class count is used.
    ``progress`` shows a bar while downloading.
    """
    record = resolve(name)
    if features_only and num_classes is not None:
        raise TypeError("num_classes has no meaning with features_only=True")
    if not features_only and (out_indices is not None or feature_location != "incre"):
        raise TypeError("out_indices and feature_location need features_only=True")
    source = record if checkpoint is None else checkpoint
    if pretrained or checkpoint is not None:
        from ..weights import load_weights, local_path

        source = local_path(source, progress=progress)  # download first: no network fails before any build
    if features_only:
        model: nn.Module = HRNetFeatures(record.arch, out_indices=out_indices or (1, 2, 3, 4),
                                         feature_location=feature_location)
    else:
        model = HRNet(record.arch, num_classes=record.num_classes if num_classes is None else num_classes,
                      drop_rate=drop_rate)
    model.pretrained_cfg = record  # travels with the model: transforms are derived from it
    if pretrained or checkpoint is not None:
        # A checkpoint of another class count (a fine-tuned model) brings its classifier along unless
        # num_classes was asked for; the published weights are the record's 1000 classes.
        load_weights(model, source, progress=progress, fit_classifier=checkpoint is not None and num_classes is None)
    return model
