"""The public builders: ``list_models``, ``get_model_info``, ``create_model``.

This is the one place that combines a model (:mod:`hrnet.models`) with its weights
(:mod:`hrnet.weights`); neither of those packages imports the other's user.
"""

from __future__ import annotations

import os

from torch import nn

from .models import HRNet, HRNetFeatures, resolve_arch
from .models.hrnet import FeatureLocation, feature_indices
from .models.imagenet import imagenet_names
from .models.zoo import MODELS, resolve
from .weights import eval_config_of, load_weights, local_path
from .weights.hrnet_format import class_names_of


def list_models() -> list[str]:
    """The canonical names of the models with published weights, seed table first."""
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

    ``name`` is a zoo name or alias (``hrnet-w18``, ``hrnet_w48_ssld``...), or a bare architecture
    (``w18``, ``w18-small``...: no published weights, the default evaluation settings).
    ``pretrained=True`` loads the record's published weights (downloaded once into the cache);
    ``checkpoint`` loads a local file, directory or URL in any supported format instead, and the
    evaluation settings stored in it (a fine-tuned hrnet file knows its input size).
    ``num_classes`` replaces the classifier (pretrained weights then load all but the classifier);
    without it, a ``checkpoint``'s own class count is used. ``progress`` shows a download bar.
    ``model.class_names`` names the outputs: the ``checkpoint``'s names when its classifier is loaded,
    ImageNet's for a zoo model's 1000 classes, else None (a new head's classes have no names yet).

    ``features_only=True`` returns a list of maps (see :class:`~hrnet.models.HRNetFeatures`):
    ``feature_location="incre"`` the head's maps, ``""`` the raw branches (``out_indices`` in 0..4,
    0 the stride-2 stem, default 1..4), ``"hrnetv2"`` the branches resized to stride 4 and
    concatenated, the segmentation representation (``out_indices`` in 0..1, default ``(1,)``).
    ``model.feature_info`` describes each map (``channels()``, ``reduction()``, ``module_name()``).
    """
    arch, record = resolve_arch(name)
    if features_only and num_classes is not None:
        raise TypeError("num_classes has no meaning with features_only=True")
    if not features_only and (out_indices is not None or feature_location != "incre"):
        raise TypeError("out_indices and feature_location need features_only=True")
    if features_only:
        out_indices = feature_indices(feature_location, out_indices)  # raises before any download
    if pretrained and checkpoint is None and record is None:
        resolve(name)  # raises: an architecture without published weights
    source = None
    if checkpoint is not None:
        source = local_path(checkpoint, progress=progress)  # download first: no network fails before any build
    elif pretrained:
        source = local_path(record, progress=progress)
    if features_only:
        model: nn.Module = HRNetFeatures(arch, out_indices=out_indices, feature_location=feature_location)
    else:
        default_classes = record.num_classes if record is not None else 1000
        model = HRNet(arch, num_classes=default_classes if num_classes is None else num_classes, drop_rate=drop_rate)
    if record is not None:
        model.pretrained_cfg = record
        model.eval_cfg = record.eval
        if not features_only and model.num_classes == record.num_classes == len(imagenet_names()):
            model.class_names = imagenet_names()
    if source is not None:
        # A checkpoint of another class count (a fine-tuned model) brings its classifier along unless
        # num_classes was asked for; the published weights are the record's 1000 classes.
        metadata = load_weights(model, source, progress=progress,
                                fit_classifier=checkpoint is not None and num_classes is None)
        model.eval_cfg = eval_config_of(metadata, source) or model.eval_cfg
        names = class_names_of(metadata, source) if checkpoint is not None and not features_only else None
        if names is not None:  # the file's names name its classifier: kept with it, gone with a new head
            model.class_names = names if len(names) == model.num_classes else None
    return model
