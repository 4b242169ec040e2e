"""Does decoding starve the model? Evaluation throughput over a folder of JPEGs vs the bare model.

Both are measured in one run at the same batch size, with the same backend and torch threads, on the
same images: JPEGs of real photos at ImageNet's typical 500x375 / 375x500 in ImageNet-style folders.
The bare model runs on them preprocessed once and held in memory; ``hrnet.evaluate`` reads the files. The target is an
eval/bare ratio of at least 0.90. Random weights (no network needed): speed does not depend on them.
The two measurements alternate ``--repeat`` times and the best of each counts, which keeps other
load on a shared machine from deciding the ratio.

    python benchmarks/bench_eval.py                         # hrnet-w18, batch 32, 256 images
    python benchmarks/bench_eval.py --workers 0 1 --json    # compare decoding-process counts
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hrnet.data import default_workers, find_images, imagenet_wnids, load_image
from hrnet.inference.evaluate import evaluate
from hrnet.inference.predict import Classifier
from hrnet import create_model

SITE = os.path.dirname(os.path.dirname(np.__file__))


def write_jpegs(root: Path, n: int) -> None:
    """``n`` JPEGs (quality 90) cut from the scikit-image/scikit-learn photos, over 10 wnid folders."""
    photos = [Image.open(p).convert("RGB") for p in
              sorted(glob.glob(f"{SITE}/sklearn/datasets/images/*.jpg")) +
              [f"{SITE}/skimage/data/{f}" for f in ("astronaut.png", "chelsea.png", "coffee.png")]]
    rng = np.random.default_rng(0)
    for i in range(n):
        img = photos[i % len(photos)]
        w, h = (500, 375) if i % 3 else (375, 500)
        scale = rng.uniform(0.6, 1.0)
        cw, ch = int(img.width * scale), int(img.height * scale)
        x, y = rng.integers(0, img.width - cw + 1), rng.integers(0, img.height - ch + 1)
        d = root / imagenet_wnids()[i % 10]
        d.mkdir(parents=True, exist_ok=True)
        img.crop((x, y, x + cw, y + ch)).resize((w, h), Image.BILINEAR).save(d / f"{i:05d}.jpg", quality=90)


def preprocessed(clf: Classifier, files: list[str], batch_size: int) -> list[torch.Tensor]:
    """The same images the evaluation reads, decoded and transformed once, in memory."""
    images = [clf.transform(load_image(f)) for f in files]
    return [torch.stack(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]


def bare_throughput(clf: Classifier, batches: list[torch.Tensor]) -> float:
    """Images/s of the model alone on in-memory batches."""
    start = time.perf_counter()
    for x in batches:
        clf.logits(x)
    return sum(len(x) for x in batches) / (time.perf_counter() - start)


def decode_ms(clf: Classifier, files: list[str]) -> float:
    """CPU milliseconds to decode and transform one JPEG on one thread, as a loader worker does: the
    work taken away from the model, which is hard to see in wall times on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.process_time()
        for f in files:
            clf.transform(load_image(f))
        return 1000 * (time.process_time() - start) / len(files)
    finally:
        torch.set_num_threads(threads)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="hrnet-w18")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--workers", type=int, nargs="+", default=[default_workers("cpu")],
                   help="decoding-process counts to compare (default: hrnet's CPU default, 0)")
    p.add_argument("--backend", default="eager")
    p.add_argument("--repeat", type=int, default=3, help="alternating rounds; the best of each is kept")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    model = create_model(args.model).eval()
    clf = Classifier.build(model, device="cpu", backend=args.backend)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_jpegs(Path(tmp), args.images)
        files = find_images(tmp)
        decode = decode_ms(clf, files)
        batches = preprocessed(clf, files, args.batch_size)
        bare_throughput(clf, batches)  # warm-up: the first passes pay for allocations and kernel selection
        for workers in args.workers:
            bare = evaluated = 0.0
            for _ in range(args.repeat):
                bare = max(bare, bare_throughput(clf, batches))
                result = evaluate(model, tmp, batch_size=args.batch_size, workers=workers, device="cpu",
                                  backend=args.backend)
                assert result["n"] == args.images and not result["skipped"]
                evaluated = max(evaluated, result["images_per_s"])
            rows.append({"workers": workers, "bare_images_per_s": bare, "eval_images_per_s": evaluated,
                         "ratio": evaluated / bare})
    out = {"model": args.model, "batch_size": args.batch_size, "images": args.images, "backend": args.backend,
           "repeat": args.repeat, "decode_cpu_ms_per_image": decode,
           "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "runs": rows}
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"{args.model}, batch {args.batch_size}, {args.images} JPEGs, backend {args.backend}, "
          f"{torch.get_num_threads()} torch threads on {os.cpu_count()} CPUs; decoding {decode:.1f} CPU ms/image")
    for r in rows:
        print(f"  workers {r['workers']}: bare model {r['bare_images_per_s']:.2f} img/s, "
              f"eval {r['eval_images_per_s']:.2f} img/s, ratio {r['ratio']:.3f}")


if __name__ == "__main__":
    main()
