"""Architectures, modules, the zoo and the counter."""

from .arch import ARCHS, Arch, Stage
from .factory import create_model, get_model_info, list_models
from .flops import count_flops, count_params
from .hrnet import FeatureInfo, HRNet, HRNetFeatures
from .zoo import MODELS, EvalConfig, ModelRecord, resolve

__all__ = [
    "ARCHS", "Arch", "Stage", "create_model", "get_model_info", "list_models", "count_flops", "count_params",
    "FeatureInfo", "HRNet", "HRNetFeatures", "MODELS", "EvalConfig", "ModelRecord", "resolve",
]
