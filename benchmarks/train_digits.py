"""Train hrnet-w18-small from scratch on scikit-learn's handwritten digits and report held-out accuracy.

The 1,797 real 8x8 scans (10 classes) are upscaled and written as a class-per-folder image tree
(80 % train, 20 % held out, stratified) in a temporary directory; ``configs/digits.yaml`` is the
recipe. The best checkpoint is reloaded with ``create_model(checkpoint=...)`` and scored on the
held-out images. The last line prints ``accuracy`` and the seconds taken (data writing excluded).

    python benchmarks/train_digits.py [--set key=value ...]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits

from hrnet import create_model
from hrnet.data import ImageDataset, collate, eval_transform
from hrnet.training.config import load_config
from hrnet.training.train import train

RECIPE = Path(__file__).resolve().parent.parent / "configs" / "digits.yaml"


def write_digits(root: Path, size: int = 32, held_out: float = 0.2, seed: int = 0,
                 per_class: int | None = None) -> tuple[Path, Path]:
    """Write the digits as ``root/{train,val}/<digit>/<n>.png`` (grey, ``size`` x ``size``, bilinear
    upscaling of the 0..16 values to 0..255); ``per_class`` keeps only that many images per digit."""
    digits = load_digits()
    rng = np.random.default_rng(seed)
    for label in range(10):
        idx = rng.permutation(np.flatnonzero(digits.target == label))[:per_class]
        n_val = round(len(idx) * held_out)
        for split, part in (("val", idx[:n_val]), ("train", idx[n_val:])):
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            for i in part:
                pixels = (digits.images[i] * (255 / 16)).round().astype(np.uint8)
                Image.fromarray(pixels, "L").resize((size, size), Image.BILINEAR).save(folder / f"{i:04d}.png")
    return root / "train", root / "val"


@torch.no_grad()
def held_out_accuracy(name: str, weights: Path, val_dir: Path, input_size: int) -> float:
    """Top-1 of the exported weights on the held-out folder, through the public loading path and the
    evaluation transform of ``hrnet eval --input-size``."""
    model = create_model(name, checkpoint=weights, num_classes=10).eval()
    data = ImageDataset(val_dir, transform=eval_transform(model, input_size=input_size))
    correct = total = 0
    for batch in torch.utils.data.DataLoader(data, batch_size=128, collate_fn=collate):
        correct += (model(batch.images).argmax(1) == batch.labels).sum().item()
        total += len(batch.labels)
    return correct / total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override the recipe")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        train_dir, val_dir = write_digits(Path(tmp) / "digits")
        cfg = load_config(RECIPE, [f"data.train={train_dir}", f"data.val={val_dir}", f"output.dir={tmp}/run",
                                   *args.set])
        start = time.perf_counter()
        result = train(cfg, quiet=args.quiet)
        seconds = time.perf_counter() - start
        accuracy = held_out_accuracy(cfg.model.name, result.best_weights, val_dir, cfg.data.input_size)
    print(f"model {cfg.model.name}  input {cfg.data.input_size}  epochs {cfg.schedule.epochs}  "
          f"steps {result.steps}  threads {torch.get_num_threads()}")
    print(f"accuracy {accuracy:.4f}  seconds {seconds:.1f}")
    return 0 if accuracy >= 0.97 else 1


if __name__ == "__main__":
    sys.exit(main())
