"""hrnet: the HRNet image classifiers of the MMClassification model zoo, exact and fast."""

from .builder import create_model, get_model_info, list_models
from .deploy.optimize import optimize
from .errors import HRNetError, UnknownModelError
from .inference.cam import cam_image
from .inference.evaluate import evaluate
from .inference.batch import predict_to_file
from .inference.predict import predict
from .models import count_flops, count_params
from .weights import convert_checkpoint, load_checkpoint, save_checkpoint

from ._version import __version__
__all__ = [
    "HRNetError", "UnknownModelError", "cam_image", "convert_checkpoint", "count_flops", "count_params",
    "create_model", "evaluate", "get_model_info", "list_models", "load_checkpoint", "optimize", "predict",
    "predict_to_file",
    "save_checkpoint",
]
