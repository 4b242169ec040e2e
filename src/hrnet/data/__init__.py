"""Images in, tensors out: robust decoding, labelled datasets, and the exact mmcls eval transform."""

from .dataset import (IMAGE_EXTENSIONS, Batch, DatasetError, Failed, ImageDataset, ImageList, Sample, collate,
                      find_images, is_image_file)
from .decode import ImageReadError, NotAnImageError, decode_image, display_path, load_image
from .imagenet import class_names, imagenet_names, imagenet_wnids
from .loader import default_workers, inference_loader, shard
from .transforms import EvalTransform, TransformConfigError, eval_transform

__all__ = [
    "IMAGE_EXTENSIONS", "Batch", "DatasetError", "EvalTransform", "Failed", "ImageDataset", "ImageList",
    "ImageReadError", "NotAnImageError", "Sample", "TransformConfigError", "class_names", "collate", "decode_image",
    "default_workers", "display_path", "eval_transform", "find_images", "imagenet_names", "imagenet_wnids",
    "inference_loader", "is_image_file",
    "load_image", "shard",
]
