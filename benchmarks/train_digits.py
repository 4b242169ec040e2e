"""Train hrnet-w18-small from scratch on scikit-learn's handwritten digits and report held-out accuracy.

The 1,797 real 8x8 scans (10 classes) are upscaled and written as a class-per-folder image tree
(80 % train, 20 % held out, stratified) in a temporary directory, by the function behind
``hrnet data digits``; ``hrnet train digits`` is the recipe. The best checkpoint is reloaded with
``create_model(checkpoint=...)`` and scored on the held-out images. The last line prints
``accuracy`` and the seconds taken (data writing excluded).

    python benchmarks/train_digits.py [--set key=value ...]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from hrnet import create_model
from hrnet.data import ImageDataset, collate, digits, eval_transform
from hrnet.training.config import load_config
from hrnet.training.train import train

RECIPE = "digits"  # the packaged recipe (hrnet recipes digits)


def write_digits(root: Path, size: int = 32, held_out: float = 0.2, seed: int = 0,
                 per_class: int | None = None) -> tuple[Path, Path]:
    """``hrnet data digits ROOT --size SIZE --val-fraction HELD_OUT --seed SEED`` (the library function);
    ``per_class`` keeps only that many images per digit. Kept under this name for the tests and
    bench_train.py."""
    return digits.write_digits(root, size=size, val_fraction=held_out, seed=seed, per_class=per_class)


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
