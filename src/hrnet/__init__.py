"""hrnet: the HRNet image classifiers of the MMClassification model zoo, exact and fast."""

from .errors import HRNetError, UnknownModelError
from .models import count_flops, count_params, create_model, get_model_info, list_models
from .engine.cam import cam_image
from .engine.evaluate import evaluate
from .engine.predict import predict
from .weights import load_checkpoint, save_checkpoint

__version__ = "0.1.0"
__all__ = [
    "HRNetError", "UnknownModelError", "cam_image", "count_flops", "count_params", "create_model", "evaluate",
    "get_model_info", "list_models", "load_checkpoint", "predict", "save_checkpoint",
]
