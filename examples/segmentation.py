"""HRNet as a segmentation backbone: per-pixel digit masks from real scans, mIoU on held-out scans.

Each canvas holds 2-4 handwritten digits from scikit-learn's digits set (real 8x8 scans, upscaled and
placed at random); the mask is digit + 1 where a scan has ink, 0 (background) elsewhere. A small head
(two 1x1 convs) on the HRNetV2 representation of hrnet-w18-small, the four branches resized to
stride 4 and concatenated (240 channels: its widths are 16-128), predicts the mask. Training and test canvases are built
from disjoint scans, in memory; nothing is written.

    python examples/segmentation.py --checkpoint hrnet_w18_small.safetensors   # from ImageNet weights
    python examples/segmentation.py                                           # from scratch
    python examples/segmentation.py --epochs 1 --train-size 64                # a smoke run
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import hrnet

NUM_CLASSES = 11  # background + digits 0..9


def make_canvases(scans: np.ndarray, digits: np.ndarray, count: int, size: int,
                  rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` grey canvases (N, size, size) in 0..1 and their masks (N, size, size), from 8x8 scans (0..16)."""
    images = np.zeros((count, size, size), np.float32)
    masks = np.zeros((count, size, size), np.int64)
    for n in range(count):
        for _ in range(rng.integers(2, 5)):
            k = rng.integers(len(scans))
            side = int(rng.integers(size // 4, size * 7 // 16 + 1))
            scan = torch.from_numpy(scans[k] / 16.0).float()[None, None]
            scan = F.interpolate(scan, size=(side, side), mode="bilinear", align_corners=False)[0, 0].numpy()
            top, left = rng.integers(0, size - side + 1, 2)
            image, mask = images[n, top:top + side, left:left + side], masks[n, top:top + side, left:left + side]
            np.maximum(image, scan, out=image)  # a later digit is drawn over an earlier one
            mask[scan > 0.3] = digits[k] + 1
    return torch.from_numpy(images), torch.from_numpy(masks)


class Segmenter(nn.Module):
    """HRNetV2 features -> 1x1 conv, BN, ReLU -> 1x1 conv to class scores, upsampled to the input."""

    def __init__(self, backbone: nn.Module, hidden: int = 64):
        super().__init__()
        self.backbone = backbone
        channels = backbone.feature_info.channels(0)  # 15 x the width (240 here): the one map, at stride 4
        self.head = nn.Sequential(nn.Conv2d(channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden),
                                  nn.ReLU(inplace=True), nn.Conv2d(hidden, NUM_CLASSES, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (features,) = self.backbone(x)
        return F.interpolate(self.head(features), size=x.shape[-2:], mode="bilinear", align_corners=False)


def mean_iou(model: nn.Module, images: torch.Tensor, masks: torch.Tensor, batch: int) -> tuple[float, float]:
    """(mIoU over the classes present in the masks or predictions, pixel accuracy)."""
    confusion = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.long)
    model.eval()
    with torch.no_grad():
        for i in range(0, len(images), batch):
            pred = model(images[i:i + batch]).argmax(1)
            confusion += torch.bincount(masks[i:i + batch].flatten() * NUM_CLASSES + pred.flatten(),
                                        minlength=NUM_CLASSES ** 2).view(NUM_CLASSES, NUM_CLASSES)
    hits = confusion.diag().double()
    union = confusion.sum(0) + confusion.sum(1) - confusion.diag()
    iou = hits[union > 0] / union[union > 0]
    return iou.mean().item(), (hits.sum() / confusion.sum()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="the model's weights, any format hrnet reads (default: from scratch)")
    parser.add_argument("--model", default="hrnet-w18-small")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--train-size", type=int, default=1024, help="training canvases")
    parser.add_argument("--test-size", type=int, default=256, help="held-out canvases")
    parser.add_argument("--canvas", type=int, default=64, help="canvas side in pixels")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=4e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="print only the result")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    digits = load_digits()
    order = rng.permutation(len(digits.target))
    held_out = order[: len(order) // 5]  # a fifth of the scans appear only in test canvases
    train = order[len(order) // 5:]
    x_train, y_train = make_canvases(digits.images[train], digits.target[train], args.train_size, args.canvas, rng)
    x_test, y_test = make_canvases(digits.images[held_out], digits.target[held_out], args.test_size, args.canvas, rng)

    backbone = hrnet.create_model(args.model, features_only=True, feature_location="hrnetv2",
                                  checkpoint=args.checkpoint)
    if not args.quiet:
        start = f"from {args.checkpoint}" if args.checkpoint else "from scratch (no --checkpoint given)"
        print(f"{args.model} HRNetV2 features: {backbone.feature_info.channels(0)} channels at stride "
              f"{backbone.feature_info.reduction(0)}, {start}")
    model = Segmenter(backbone)
    mean = torch.tensor(backbone.eval_cfg.mean).view(1, 3, 1, 1) / 255
    std = torch.tensor(backbone.eval_cfg.std).view(1, 3, 1, 1) / 255
    x_train, x_test = ((x[:, None].expand(-1, 3, -1, -1) - mean) / std for x in (x_train, x_test))  # grey as RGB

    steps = args.epochs * -(-args.train_size // args.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=max(steps, 1))
    began = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        total = 0.0
        for idx in torch.randperm(args.train_size).split(args.batch_size):
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(idx)
        if not args.quiet:
            print(f"epoch {epoch + 1}/{args.epochs}: loss {total / args.train_size:.4f} "
                  f"({time.perf_counter() - began:.0f} s)")
    miou, accuracy = mean_iou(model, x_test, y_test, args.batch_size)
    print(f"mIoU {miou:.4f}, pixel accuracy {accuracy:.4f} on {args.test_size} held-out canvases "
          f"({NUM_CLASSES} classes, {args.epochs} epochs on {args.train_size} canvases)")


if __name__ == "__main__":
    main()
