"""Architectures, modules, the zoo records and the counter. Nothing here loads weights: the builder
(:mod:`hrnet.builder`) combines these models with :mod:`hrnet.weights`."""

from .arch import ARCHS, Arch, Stage
from .flops import count_flops, count_params
from .hrnet import FeatureInfo, FeatureInfoList, HRNet, HRNetFeatures, HRNetTrunk
from .zoo import MODELS, EvalConfig, ModelRecord, models_of, resolve, resolve_arch

__all__ = [
    "ARCHS", "Arch", "Stage", "count_flops", "count_params", "FeatureInfo", "FeatureInfoList", "HRNet", "HRNetFeatures", "HRNetTrunk",
    "MODELS", "EvalConfig", "ModelRecord", "models_of", "resolve", "resolve_arch",
]
