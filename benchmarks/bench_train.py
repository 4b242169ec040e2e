"""Training throughput: hrnet's trainer against a plain hand-written PyTorch loop, in the same run.

Both train the same model (``hrnet-w18-small`` from the same seed) on the same images (the digits
folder of ``train_digits.py`` through the same ``TrainTransform``), with the same batch, SGD
settings and DataLoader workers, for one epoch each, alternating ``--rounds`` times; the best
round of each is reported (the machine may be shared). The trainer's figure covers its training
steps, as its JSON log reports them (the NaN guard, metrics and logging included); its end-of-epoch
checkpoint and weight export are timed separately.

    python benchmarks/bench_train.py [--input-size 32] [--batch-size 32] [--rounds 2]
    python benchmarks/bench_train.py --against /tmp/hrnet-before   # also another checkout's trainer

With ``--against CHECKOUT`` both trainers (this tree's and ``CHECKOUT/src``'s) run in fresh
subprocesses, alternating in the same rounds, and the last line gives their ratio: how the cost of
a change to the trainer (e.g. the fault-tolerance checks, target <= 2 %) is measured on one machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from hrnet import create_model
from hrnet.data import ImageDataset, collate
from hrnet.data.augment import TrainTransform
from hrnet.training.config import Config, load_config
from hrnet.training.train import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_digits import write_digits  # noqa: E402


def plain_loop(cfg: Config) -> float:
    """Images/s of the textbook loop: DataLoader, forward, cross-entropy, backward, SGD step."""
    torch.manual_seed(cfg.train.seed)
    model = create_model(cfg.model.name, num_classes=10).train()
    lr = cfg.optim.lr * cfg.data.batch_size / 256
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.optim.momentum,
                          weight_decay=cfg.optim.weight_decay)
    transform = TrainTransform(cfg.data.input_size, scale=cfg.data.crop_scale, hflip=cfg.data.hflip)
    loader = DataLoader(ImageDataset(cfg.data.train, transform=transform), batch_size=cfg.data.batch_size,
                        shuffle=True, drop_last=True, collate_fn=collate, num_workers=cfg.data.workers)
    images = 0
    start = time.perf_counter()
    for batch in loader:
        loss = torch.nn.functional.cross_entropy(model(batch.images), batch.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        images += len(batch.labels)
    return images / (time.perf_counter() - start)


def trainer(cfg: Config) -> tuple[float, float]:
    """(images/s over the training steps, seconds of the end-of-epoch checkpoint and export)."""
    t = Trainer(cfg, quiet=True)
    start = time.perf_counter()
    t.fit()
    total = time.perf_counter() - start
    records = [json.loads(line) for line in (t.run_dir / "log.jsonl").read_text().splitlines()]
    previous, step_seconds = 0, 0.0
    for r in records:
        if r["kind"] == "step":  # each line covers the steps since the previous one
            step_seconds += (r["step"] - previous) * t.global_batch / r["images_per_s"]
            previous = r["step"]
    return t.steps_per_epoch * t.global_batch / step_seconds, total - step_seconds


RECIPE = "digits"  # the packaged recipe (hrnet recipes digits)


def overrides(args: argparse.Namespace, train_dir: str, run_dir: str) -> list[str]:
    return [f"data.train={train_dir}", "data.val=null", f"data.input_size={args.input_size}",
            f"data.batch_size={args.batch_size}", f"data.workers={args.workers}", "schedule.epochs=1",
            "schedule.warmup_epochs=0", "output.log_every=10", f"output.dir={run_dir}"]


def trainer_in(checkout: Path, args: argparse.Namespace, train_dir: str, run_dir: str) -> tuple[float, float]:
    """:func:`trainer` in a fresh interpreter importing hrnet from ``checkout/src`` (another checkout's, or
    this one's), on that checkout's digits recipe (older ones kept it in ``configs/``, not in the package)."""
    old_recipe = checkout / "configs" / f"{RECIPE}.yaml"
    recipe = str(old_recipe) if old_recipe.is_file() else RECIPE
    env = {**os.environ, "PYTHONPATH": str(checkout / "src")}
    cmd = [sys.executable, __file__, "--worker", json.dumps([recipe, overrides(args, train_dir, run_dir)])]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"the trainer of {checkout} failed:\n{proc.stderr[-3000:]}")
    return tuple(json.loads(proc.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--against", metavar="CHECKOUT", type=Path,
                        help="another checkout of hrnet whose trainer is timed too (both in subprocesses)")
    parser.add_argument("--worker", metavar="OVERRIDES", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:  # one trainer measurement, for --against
        recipe, settings = json.loads(args.worker)
        print(json.dumps(trainer(load_config(recipe, settings))))
        return 0
    here = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as tmp:
        train_dir, _ = write_digits(Path(tmp) / "digits", size=args.input_size)
        plain, ours, before = [], [], []
        for r in range(args.rounds):
            cfg = load_config(RECIPE, overrides(args, train_dir, f"{tmp}/run{r}"))
            plain.append(plain_loop(cfg))
            if args.against:
                ips, extra = trainer_in(here, args, train_dir, f"{tmp}/ours{r}")
                before.append(trainer_in(args.against.resolve(), args, train_dir, f"{tmp}/before{r}")[0])
            else:
                ips, extra = trainer(cfg)
            ours.append(ips)
            print(f"round {r + 1}: plain loop {plain[-1]:.1f} img/s, hrnet trainer {ours[-1]:.1f} img/s "
                  f"(+{extra:.1f} s checkpoint and export)" +
                  (f", {args.against} trainer {before[-1]:.1f} img/s" if before else ""), flush=True)
    print(f"model {cfg.model.name}  input {args.input_size}  batch {args.batch_size}  threads {torch.get_num_threads()}")
    print(f"plain_loop {max(plain):.1f} img/s  trainer {max(ours):.1f} img/s  ratio {max(ours) / max(plain):.3f}")
    if before:
        print(f"against {args.against}: trainer {max(ours):.1f} img/s  before {max(before):.1f} img/s  "
              f"ratio {max(ours) / max(before):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
