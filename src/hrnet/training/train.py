"""The trainer: one config, one CPU or many GPUs under torchrun, resumable at any step.

A run directory holds ``config.yaml`` (the resolved config), ``log.jsonl`` (one JSON line per
logged step and per epoch), ``checkpoints/step-*.pt`` (the last ``keep_last`` training states) and
``best.safetensors`` (the best model so far in hrnet's weights format, loadable with
``create_model(name, checkpoint=...)`` and ``hrnet eval --checkpoint``). :func:`train` locks the
directory for the run and never overwrites a previous run in it (see :mod:`hrnet.training.rundir`);
no file is written with a NaN or Inf in it.

Reproducibility rests on :mod:`hrnet.training.sampler`: sample order and crops are functions of
(seed, epoch, position), and a checkpoint stores every generator's state plus the position in the
epoch (a global sample index), so a resumed run continues bit for bit (CPU, ``train.deterministic``).

Fault tolerance (docs/guides/cluster.md): ``resume="auto"`` (and any start under a torchrun restart,
``TORCHELASTIC_RESTART_COUNT`` > 0) continues from the newest checkpoint or starts; SIGTERM/SIGUSR1
finish the step in flight, write a checkpoint on every rank together and end the run with
``TrainResult.stopped_by`` set (``hrnet train`` exits with :data:`EXIT_PREEMPTED`); a second signal ends
the process at once. A resume on another number of processes keeps the run's global batch (and so
its learning rate and schedule), each process taking ``global batch / processes``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import resource
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..builder import create_model
from ..data import DatasetError, EvalTransform, ImageDataset, collate, default_workers, shard
from ..data.augment import TrainTransform
from ..data.dataset import read_split, split_per_class
from ..data.dataset import write_split as save_split
from ..distributed import (DistInfo, all_gather_objects, all_reduce_sum, barrier, broadcast_object, guard,
                           init_distributed)
from ..errors import HRNetError
from ..fileio import atomic_write, display_path
from ..models import EvalConfig, resolve, resolve_arch
from ..weights import eval_config_of, local_path, save_checkpoint
from ..weights.layouts import infer_arch
from ..weights.loading import read_state_dict
from .config import RESUMABLE, RESUMABLE_TEXT, Config, ConfigError, flatten
from .optim import EMA, build_optimizer, build_scheduler, scaled_lr
from .rundir import EXIT_PREEMPTED, claim_run_dir, read_jsonl, writing  # noqa: F401 (EXIT_PREEMPTED: API)
from .state import ResumeError, checkpoints, first_nonfinite, load_state, prune, rng_state, save_state, set_rng_state
from .sampler import EpochSeeded, ShardedBatchSampler
from .syncbn import convert_sync_batchnorm


class NonFiniteLossError(HRNetError):
    """The loss became NaN or infinite; the weights were not updated with it."""


class NonFiniteWeightsError(HRNetError):
    """A weight or optimizer tensor holds NaN or Inf; no checkpoint was written with it."""


# Where the initial weights came from: irrelevant once a checkpoint is loaded, so kept as the run began.
STARTING_POINT = ("model.pretrained", "model.checkpoint")


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    steps: int
    best_metric: float | None  # validation top-1 (%) or, without a validation set, training accuracy
    best_weights: Path | None  # hrnet weights file of the best epoch
    last_metric: float | None = None  # the same metric after the last epoch
    log: Path | None = None  # the run's log.jsonl
    stopped_by: str | None = None  # "SIGTERM"/"SIGUSR1": stopped early with a checkpoint, to be resumed
    start: str = "random"  # the initial weights: "random" (from scratch), "pretrained" or the checkpoint's path
    class_names: tuple[str, ...] | None = None  # the model's classes, as every written checkpoint records them


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def restart_count() -> int:
    """How many times torchrun restarted this worker group (0 outside torchrun)."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def eval_config(cfg: Config) -> EvalConfig:
    """How the trained model is evaluated: its zoo record's pipeline at ``data.input_size`` (the resize
    scaled by the same crop fraction). ``best.safetensors`` carries it, so ``hrnet eval`` uses it."""
    record = resolve_arch(cfg.model.name)[1]
    base = record.eval if record is not None else EvalConfig()
    size = cfg.data.input_size
    return dataclasses.replace(base, input_size=size, resize_size=math.floor(size / base.crop_pct))


def check_device(device: str | None) -> None:
    """Refuse ``train.device`` values this machine cannot run, before anything is built on them."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"train.device={device}: not a device; use cpu, cuda, cuda:1 ... or leave it unset") \
            from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device={device}: no CUDA GPU is available here; set train.device=cpu or leave "
                              "it unset")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"train.device={device}: this machine has {torch.cuda.device_count()} GPU(s)")
    elif dev.type != "cpu":
        raise ConfigError(f"train.device={device}: training runs on cpu or cuda")


SPLIT_NAME = "split.json"


def checkpoint_facts(checkpoint: str | os.PathLike) -> tuple[str, int | None]:
    """(model name, input size) of a weights file, for ``hrnet train --checkpoint``: the zoo model or
    architecture it names (hrnet's format), else the architecture its tensors fit; the input size
    its evaluation settings give (None when it has none)."""
    path = local_path(checkpoint)
    sd, metadata, layout = read_state_dict(path)
    name = metadata.get("model") or metadata.get("arch")
    try:
        if name:
            resolve_arch(name)
    except HRNetError:
        name = metadata.get("arch")
    if not name:
        found = infer_arch(sd, layout)
        if found is None:
            raise ConfigError(f"{checkpoint}: cannot tell which HRNet these weights are; name it with "
                              "--set model.name=NAME (hrnet list)")
        name = found[0].name
    evaluation = eval_config_of(metadata, path)
    return name, evaluation.input_size if evaluation else None


def build_datasets(cfg: Config, run_dir: Path | None = None, *, write_split: bool = True
                   ) -> tuple[Dataset, Dataset | None]:
    """The training set with the recipe's augmentation and the validation set with the model's
    evaluation transform (:func:`eval_config`). The validation folder is labelled by the training
    set's class names, so it may hold a subset of the classes and may not hold others.

    Without ``data.val`` and with ``data.val_fraction`` > 0, each class of ``data.train`` is split
    (:func:`hrnet.data.dataset.split_per_class`) into ``run_dir/split.json``; when that file is
    already there (only a resumed run's directory holds one), its split is reused as it is."""
    if not cfg.data.train:
        raise ConfigError("config: data.train is not set: pass --data DIR (a folder of class folders, or one with "
                          "train/ and val/) or --set data.train=DIR")
    for folder in (cfg.data.train, cfg.data.val):
        if folder and cfg.data.prepare and not Path(folder).is_dir():
            raise DatasetError(f"{folder}: data folder not found; run `{cfg.data.prepare}` first")
    evaluation = eval_config(cfg)
    train_tf = TrainTransform(cfg.data.input_size, scale=cfg.data.crop_scale, hflip=cfg.data.hflip,
                              mean=evaluation.mean, std=evaluation.std)
    val_tf = EvalTransform.from_config(evaluation)
    train_set = ImageDataset(cfg.data.train, ann_file=cfg.data.train_ann, transform=train_tf)
    val_set = None
    if cfg.data.val:
        names = train_set.classes if train_set.layout == "folders" else None
        val_set = ImageDataset(cfg.data.val, ann_file=cfg.data.val_ann, transform=val_tf, class_names=names)
    elif cfg.data.val_fraction > 0:
        path = Path(run_dir if run_dir is not None else cfg.output.dir) / SPLIT_NAME
        if path.exists():
            split = read_split(path)
        else:
            split = split_per_class(train_set, cfg.data.val_fraction, cfg.train.seed)
            if write_split:
                with writing(path):
                    path.parent.mkdir(parents=True, exist_ok=True)
                    save_split(split, path)
        if split.get("classes") != train_set.classes:
            raise DatasetError(f"{path}: was split over the classes {split.get('classes')!r:.120}, {cfg.data.train} "
                               f"now has {train_set.classes!r:.120}; start a new run")
        source = display_path(path)
        train_set, val_set = (train_set.select(split["train"], transform=train_tf, source=source),
                              train_set.select(split["val"], transform=val_tf, source=source))
        if not len(val_set):
            val_set = None
    return train_set, val_set


def fit_head(model: nn.Module, names: tuple[str, ...] | None, num_classes: int, source: str) -> str | None:
    """Give ``model`` (weights loaded from ``source``) a classifier for the data's ``num_classes``
    classes called ``names``; return the one line saying what happened to its head (None: kept as is).

    A head whose class names include every one of the data's is kept, its rows reordered (or chosen)
    to the data's class order, mapped by name; a head of another size, or of other names, is replaced
    by a fresh one. A head of the right size without names is kept in its order."""
    head = model.classifier
    had = head.out_features if isinstance(head, nn.Linear) else 0
    old = tuple(getattr(model, "class_names", None) or ())
    if names and old and set(names) <= set(old):
        rows = [old.index(c) for c in names]
        if rows == list(range(had)):
            return None
        weight, bias = head.weight.detach()[rows].clone(), head.bias.detach()[rows].clone()
        model.reset_classifier(len(rows))
        with torch.no_grad():
            model.classifier.weight.copy_(weight)
            model.classifier.bias.copy_(bias)
        return (f"hrnet: {source}: kept its head for the data's {len(rows)} classes, matched by name "
                f"(of its {had})")
    if had == num_classes and not (names and old):
        return None
    model.reset_classifier(num_classes)
    why = f"its {had}-class head" if had != num_classes else "its head (other class names)"
    return f"hrnet: {source}: {why} replaced by a new {num_classes}-class head for the data's classes"


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class Trainer:
    """Builds everything a run needs from ``cfg`` and runs it with :meth:`fit`.

    ``train_set``/``val_set`` replace the folders named in the config: any dataset whose items are
    :class:`hrnet.data.Sample` (or :class:`hrnet.data.Failed`, dropped), with a ``classes`` list.
    """

    def __init__(self, cfg: Config, *, train_set: Dataset | None = None, val_set: Dataset | None = None,
                 quiet: bool = False, global_batch: int | None = None, source: str = "config"):
        """``global_batch`` (from the checkpoint to resume) fixes the batch of all processes together;
        each process takes ``global_batch / world size``. Default: ``data.batch_size`` x world size."""
        self.cfg, self.quiet = cfg, quiet
        check_device(cfg.train.device)
        self.dist: DistInfo = init_distributed(cfg.train.device, cfg.train.collective_timeout_s)
        ws = self.dist.world_size
        if global_batch is not None and global_batch % ws:
            fits = [n for n in range(1, global_batch + 1) if global_batch % n == 0][:8]
            raise ConfigError(f"{source}: the run's global batch is {global_batch}; {ws} processes cannot split it "
                              f"evenly; resume on {', '.join(map(str, fits))} ... processes (a divisor of "
                              f"{global_batch}), or start a new run in another output.dir")
        self.batch_size = global_batch // ws if global_batch is not None else cfg.data.batch_size
        self.device = torch.device(self.dist.device)
        if cfg.train.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        if train_set is None:
            train_set, val_set = build_datasets(cfg, write_split=self.dist.is_main)
        self.train_set, self.val_set = train_set, val_set
        self.num_classes = cfg.model.num_classes or len(train_set.classes)  # type: ignore[attr-defined]
        for key, data in (("data.train", train_set), ("data.val", val_set)):
            found = len(getattr(data, "classes", None) or ())
            if found > self.num_classes:
                raise ConfigError(f"model.num_classes={self.num_classes}, but {key} has {found} classes (labels up "
                                  f"to {found - 1}); set model.num_classes={found} or null (one per class folder)")
        self.run_dir = Path(cfg.output.dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.log_path = self.run_dir / "log.jsonl"

        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        names = getattr(train_set, "class_names", None)
        names = tuple(names) if names and len(names) == self.num_classes else None
        m = cfg.model
        model = create_model(m.name, pretrained=m.pretrained, checkpoint=m.checkpoint, drop_rate=m.drop_rate,
                             num_classes=None if m.pretrained or m.checkpoint else self.num_classes)
        source = m.checkpoint or (f"{m.name}'s published weights" if m.pretrained else None)
        # what fit() says before the first step: a replaced head, or that the weights are random
        self.start_note = fit_head(model, names, self.num_classes, source) if source else \
            f"hrnet: {m.name} starts from random weights (no model.pretrained, no --checkpoint): training from scratch"
        model.class_names = names  # every checkpoint written from here on carries them
        model.eval_cfg = eval_config(cfg)  # what best.safetensors will say about evaluating it
        if cfg.train.sync_bn and self.dist.distributed:
            model = convert_sync_batchnorm(model, self.device)
        model = model.to(self.device)
        if cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        # what the training step calls: the DDP wrapper in a distributed run, else the model itself
        self.train_model = (DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda"
                                            else None) if self.dist.distributed else model)
        self.ema = EMA(model, cfg.train.ema_decay) if cfg.train.ema_decay else None
        random.seed(cfg.train.seed + self.dist.rank)
        np.random.seed(cfg.train.seed + self.dist.rank)
        torch.manual_seed(cfg.train.seed + self.dist.rank)

        self.global_batch = self.batch_size * ws
        self.lr = scaled_lr(cfg, self.global_batch)
        self.optimizer = build_optimizer(cfg, self.model.parameters(), self.lr)
        self.sampler = ShardedBatchSampler(len(train_set), self.batch_size, rank=self.dist.rank,
                                           world_size=ws, seed=cfg.train.seed)
        self.steps_per_epoch = self.sampler.batches_per_epoch
        if self.steps_per_epoch == 0:
            raise ConfigError(f"config: {len(train_set)} training images make no full global batch of "
                              f"{self.global_batch} (data.batch_size x processes)")
        self.total_steps = cfg.schedule.epochs * self.steps_per_epoch
        self.scheduler = build_scheduler(cfg, self.optimizer, self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.train.amp == "fp16")
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.epoch_sums = torch.zeros(3, dtype=torch.float64)  # this rank's loss x n, correct, n so far
        self.best_metric: float | None = None
        self.last_metric: float | None = None
        self.last_checkpoint: Path | None = None
        self.signalled: str | None = None  # the stop signal this process received
        self.stopped_by: str | None = None  # set on every rank once the ranks agreed to stop

    # ---- state -------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """The complete training state (a collective call: every rank contributes its RNG state)."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema else None,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "sample_in_epoch": self.batch_in_epoch * self.global_batch,  # the sampler's global position
            "step": self.step,
            "epoch_sums": all_gather_objects(self.epoch_sums.clone()),
            "best_metric": self.best_metric,
            "world_size": self.dist.world_size,
            "global_batch": self.global_batch,
            "rng": all_gather_objects(rng_state()),
            "config": self.cfg.to_dict(),
            "class_names": list(self.model.class_names) if getattr(self.model, "class_names", None) else None,
        }

    def _check_finite(self, tensors: dict[str, Any], path: Path) -> None:
        """Refuse to write ``path`` if any tensor in ``tensors`` holds NaN or Inf (a diverged run)."""
        bad = first_nonfinite(tensors)
        if bad is not None:
            where = f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else \
                "no checkpoint was written"
            raise NonFiniteWeightsError(f"{bad} holds NaN/Inf at step {self.step} (epoch {self.epoch}); did not "
                                        f"write {path}; {where}; lower optim.lr or set train.clip_grad_norm")

    def save(self) -> None:
        state = self.state()
        path = self.ckpt_dir / f"step-{self.step:08d}.pt"
        self._check_finite({k: state[k] for k in ("model", "optimizer", "ema")}, path)  # same on every rank
        if self.dist.is_main:
            save_state(state, path)
            prune(self.ckpt_dir, self.cfg.output.keep_last)
            self.last_checkpoint = path
        barrier()

    def resume(self, path: str | os.PathLike | None = None, state: dict[str, Any] | None = None) -> Path:
        """Load a checkpoint (default: the newest in the run directory; ``state``: it, already loaded) and
        continue from its step. Written by another number of processes, it continues at the same global
        sample index with the same global batch (see :meth:`__init__`)."""
        if path is None:
            found = checkpoints(self.ckpt_dir)
            if not found:
                raise ResumeError(f"{self.ckpt_dir}: no checkpoint to resume from")
            path = found[-1]
        path = Path(path)
        state = load_state(path) if state is None else state
        changed = self._adopt_config(state.get("config"), path)
        if state.get("global_batch") != self.global_batch:
            raise ResumeError(f"{path}: written with global batch {state.get('global_batch')}, this run has "
                              f"{self.global_batch}; resume with hrnet train --resume, which keeps it")
        if self.ema and state.get("ema") is None:
            raise ResumeError(f"{path}: has no EMA weights but train.ema_decay is set")
        same_world = state.get("world_size") == self.dist.world_size
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
            if self.ema:
                self.ema.module.load_state_dict(state["ema"])
            self.epoch, self.step = state["epoch"], state["step"]
            sample = state.get("sample_in_epoch", state["batch_in_epoch"] * state["global_batch"])
            self.batch_in_epoch = sample // self.global_batch
            if same_world:
                self.epoch_sums = state["epoch_sums"][self.dist.rank]
                set_rng_state(state["rng"][self.dist.rank])
            else:  # the epoch's sums so far live on rank 0; generators restart from (seed, rank, step)
                total = torch.stack(list(state["epoch_sums"])).sum(0)
                self.epoch_sums = total if self.dist.is_main else torch.zeros_like(total)
                torch.manual_seed(self.cfg.train.seed + 7919 * self.step + self.dist.rank)
            self.best_metric = state.get("best_metric")
        except (RuntimeError, ValueError, KeyError, IndexError, TypeError) as e:
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise ResumeError(f"{path}: does not fit this run's model and optimizer ({first}); resume with the "
                              "config it was written with") from None
        self.last_checkpoint = path
        if self.dist.is_main:
            self._truncate_log()
            record = {"kind": "resume", "epoch": self.epoch, "step": self.step, "checkpoint": str(path),
                      "restart": restart_count(), "world_size": self.dist.world_size,
                      "batch_per_process": self.batch_size}
            if not same_world:
                record["previous_world_size"] = state.get("world_size")
            if changed:
                record["changed"] = {k: list(v) for k, v in changed.items()}
            self._log(record)
            if not self.quiet:
                notes = [f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items()]
                if not same_world:
                    notes.append(f"processes: {state.get('world_size')} -> {self.dist.world_size} (global batch "
                                 f"{self.global_batch} kept, {self.batch_size} per process)")
                tqdm.write(f"hrnet: resumed from {path} at step {self.step}" +
                           (" with " + ", ".join(notes) if notes else ""), file=sys.stderr)
        return path

    def _adopt_config(self, saved: Any, path: Path) -> dict[str, tuple[Any, Any]]:
        """Compare this run's config with the one ``path`` was trained with. Keys in ``RESUMABLE`` may
        change (returned as {key: (old, new)}); the starting weights are taken from ``saved``; any other
        change is a :class:`ResumeError`, since the checkpoint's optimizer and schedule would silently
        override it."""
        if not isinstance(saved, dict):
            return {}
        old, new = flatten(saved), flatten(self.cfg.to_dict())
        diff = {k: (old[k], new[k]) for k in new if k in old and old[k] != new[k] and k not in STARTING_POINT}
        refused = {k: v for k, v in diff.items() if k not in RESUMABLE}
        if refused:
            shown = "; ".join(f"{k} was {a!r}, now {b!r}" for k, (a, b) in list(refused.items())[:3])
            raise ResumeError(f"{path}: {shown}; a resumed run keeps the recipe it was trained with (only "
                              f"{RESUMABLE_TEXT} may change): "
                              "drop the change or start a new run in another output.dir")
        m = self.cfg.model
        start = {k.split(".")[1]: old.get(k, getattr(m, k.split(".")[1])) for k in STARTING_POINT}
        self.cfg = replace(self.cfg, model=replace(m, **start))
        return diff

    def _truncate_log(self) -> None:
        """Drop log lines written after the checkpoint (and a line torn by the crash), so a resumed run's
        log has no repeats."""
        if not self.log_path.exists():
            return
        kept = [r for r in read_jsonl(self.log_path) if r["step"] <= self.step]
        atomic_write(self.log_path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in kept),
                                                                     encoding="utf-8"))

    def _log(self, record: dict[str, Any]) -> None:
        if self.dist.is_main:
            with writing(self.log_path):
                self.log_path.parent.mkdir(parents=True, exist_ok=True)  # a Trainer used without train()
            with writing(self.log_path), open(self.log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    # ---- the loop ----------------------------------------------------------------------------

    def _loader(self, dataset: Dataset, **kwargs: Any) -> DataLoader:
        workers = self.cfg.data.workers
        if workers == "auto":
            local = os.environ.get("LOCAL_WORLD_SIZE", "1") if self.dist.distributed else "1"
            workers = default_workers(self.device.type, int(local) if local.isdigit() else 1)
        return DataLoader(dataset, collate_fn=collate, num_workers=workers, pin_memory=self.device.type == "cuda",
                          generator=torch.Generator(), persistent_workers=False,
                          multiprocessing_context="spawn" if workers and self.dist.distributed else None, **kwargs)

    def fit(self) -> TrainResult:
        """Train until ``schedule.epochs`` are done; return where the results are."""
        cfg = self.cfg
        if self.dist.is_main:  # what is trained: a resumed run's config with its allowed changes
            text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
            atomic_write(self.run_dir / "config.yaml", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        seeded = EpochSeeded(self.train_set, cfg.train.seed)
        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=self.quiet or not self.dist.is_main or not sys.stderr.isatty())
        if self.step == 0 and self.start_note and self.dist.is_main and not self.quiet:
            tqdm.write(self.start_note, file=sys.stderr)
        previous = self._catch_signals()
        try:
            while self.epoch < cfg.schedule.epochs and not self.stopped_by:
                bar.set_description(f"epoch {self.epoch + 1}/{cfg.schedule.epochs}")
                self._train_epoch(seeded, bar)
                if self.batch_in_epoch == self.steps_per_epoch:
                    self._end_epoch()
            if self.stopped_by:
                self._log({"kind": "stopped", "epoch": self.epoch + 1, "step": self.step, "signal": self.stopped_by,
                           "checkpoint": str(self.last_checkpoint)})
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            bar.close()
        best = self.run_dir / "best.safetensors"
        m = self.cfg.model
        start = m.checkpoint or ("pretrained" if m.pretrained else "random")
        return TrainResult(self.run_dir, self.step, self.best_metric, best if best.exists() else None,
                           self.last_metric, self.log_path, self.stopped_by, start,
                           tuple(self.model.class_names) if self.model.class_names else None)

    def _catch_signals(self) -> dict:
        """SIGTERM/SIGUSR1: note it, so the ranks stop together after the step in flight (a second one
        ends the process at once). Only the main thread can set handlers; elsewhere nothing changes."""
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum: int, frame: Any) -> None:
            if self.signalled:  # the second signal: no more waiting
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            self.signalled = signal.Signals(signum).name

        return {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}

    def _train_epoch(self, seeded: EpochSeeded, bar: tqdm) -> None:
        cfg = self.cfg
        seeded.epoch = self.epoch
        self.sampler.set_epoch(self.epoch, start=self.batch_in_epoch * self.global_batch)
        loader = self._loader(seeded, batch_sampler=self.sampler)
        self.train_model.train()
        # running sums since the last log line and over the epoch: loss x n, correct, n
        window = torch.zeros(3, dtype=torch.float64)
        tic = time.perf_counter()
        for batch in loader:
            for failed in batch.failed:  # robust decoding dropped these from the batch
                if not self.quiet:
                    tqdm.write(f"hrnet: skipped {failed.error}", file=sys.stderr)
            if not len(batch.labels):
                raise DatasetError(f"step {self.step + 1}: no image of the batch could be decoded, e.g. "
                                   f"{batch.failed[0].error}")
            stats = self._train_step(batch.images, batch.labels)
            window += stats
            self.epoch_sums += stats
            self.step += 1
            self.batch_in_epoch += 1
            bar.update(1)
            if self.step % cfg.output.log_every == 0 or self.batch_in_epoch == self.steps_per_epoch:
                totals = all_reduce_sum(window.clone())
                seconds = time.perf_counter() - tic
                record = {"kind": "step", "epoch": self.epoch + 1, "step": self.step,
                          "loss": totals[0].item() / max(totals[2].item(), 1),
                          "accuracy": 100.0 * totals[1].item() / max(totals[2].item(), 1),
                          "lr": self.optimizer.param_groups[0]["lr"],
                          "images_per_s": totals[2].item() / seconds, "memory_mb": round(_memory_mb(self.device), 1)}
                self._log(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['accuracy']:.1f}",
                                lr=f"{record['lr']:.3g}")
                window.zero_()
                tic = time.perf_counter()
            if self.stopped_by:  # every rank agreed in this step's reduction: checkpoint and stop
                if self.batch_in_epoch < self.steps_per_epoch:  # else the end of the epoch writes it
                    self.save()
                return
            if cfg.output.checkpoint_every and self.step % cfg.output.checkpoint_every == 0 \
                    and self.batch_in_epoch < self.steps_per_epoch:
                self.save()

    def _train_step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One optimisation step; returns (loss x n, correct, n) of this rank's batch."""
        cfg = self.cfg
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        if cfg.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        skip_allowed = cfg.train.on_nonfinite == "skip"
        buffers = [b.clone() for b in self.model.buffers()] if skip_allowed else []
        amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.amp)
        autocast = torch.autocast(self.device.type, dtype=amp) if amp else nullcontext()
        with guard(f"training step {self.step + 1}"):
            return self._step(images, labels, autocast, amp, skip_allowed, buffers)

    def _step(self, images, labels, autocast, amp, skip_allowed, buffers) -> torch.Tensor:
        """The body of :meth:`_train_step`, whose collectives (this one's and DDP's) run under ``guard``."""
        cfg = self.cfg
        with autocast:
            logits = self.train_model(images)
        loss = self.criterion(logits.float() if amp else logits, labels)
        # one reduction per step carries both agreements: a non-finite loss anywhere, a stop signal anywhere
        flags = all_reduce_sum(torch.tensor([0.0 if torch.isfinite(loss).item() else 1.0,
                                             1.0 if self.signalled else 0.0]))
        bad = flags[:1]
        if flags[1].item():
            self.stopped_by = self.signalled or "a signal to another rank"
        if bad.item() and not skip_allowed:
            where = f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else \
                "no checkpoint was written yet"
            raise NonFiniteLossError(f"non-finite loss ({loss.item()}) at step {self.step + 1} (epoch "
                                     f"{self.epoch + 1}); the weights were not updated; {where}")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if bad.item():
            self.optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for b, saved in zip(self.model.buffers(), buffers):
                    b.copy_(saved)
            self._log({"kind": "skipped", "epoch": self.epoch + 1, "step": self.step + 1, "loss": str(loss.item())})
            self.scheduler.step()
            return torch.zeros(3, dtype=torch.float64)
        if cfg.train.clip_grad_norm:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.train.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema:
            self.ema.update(self.model)
        n = labels.numel()
        correct = (logits.detach().argmax(1) == labels).sum().item()
        return torch.tensor([loss.item() * n, correct, n], dtype=torch.float64)

    def _end_epoch(self) -> None:
        cfg = self.cfg
        totals = all_reduce_sum(self.epoch_sums.clone())
        n = max(totals[2].item(), 1)
        record: dict[str, Any] = {"kind": "epoch", "epoch": self.epoch + 1, "step": self.step,
                                  "loss": totals[0].item() / n, "accuracy": 100.0 * totals[1].item() / n,
                                  "lr": self.optimizer.param_groups[0]["lr"]}
        metric = record["accuracy"]
        if self.val_set is not None:
            record["val_loss"], record["val_top1"] = self.validate()
            metric = record["val_top1"]
        self.epoch += 1
        self.batch_in_epoch = 0
        self.epoch_sums.zero_()
        self.last_metric = metric
        improved = self.best_metric is None or metric > self.best_metric
        if improved:
            self.best_metric = metric
            self._export_best()
        record["best"] = self.best_metric
        self._log(record)
        self.save()
        if self.dist.is_main and not self.quiet:
            val = f"  val loss {record['val_loss']:.4f}  val top-1 {record['val_top1']:.2f}%" if "val_top1" in record \
                else ""
            tqdm.write(f"epoch {self.epoch}/{cfg.schedule.epochs}: loss {record['loss']:.4f}  accuracy "
                       f"{record['accuracy']:.2f}%{val}", file=sys.stderr)

    def _eval_model(self) -> nn.Module:
        return self.ema.module if self.ema else self.model

    @torch.no_grad()
    def validate(self) -> tuple[float, float]:
        """(mean loss, top-1 %) on the validation set, each image counted once across ranks."""
        model = self._eval_model()
        was_training = model.training
        model.eval()
        sums = torch.zeros(3, dtype=torch.float64)
        part = shard(self.val_set, self.dist.rank, self.dist.world_size)
        for batch in self._loader(part, batch_size=self.cfg.data.batch_size):
            if not len(batch.labels):
                continue
            images, labels = batch.images.to(self.device), batch.labels.to(self.device)
            if self.cfg.train.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            logits = model(images).float()
            sums += torch.tensor([nn.functional.cross_entropy(logits, labels, reduction="sum").item(),
                                  (logits.argmax(1) == labels).sum().item(), labels.numel()], dtype=torch.float64)
        model.train(was_training)
        totals = all_reduce_sum(sums)
        n = max(totals[2].item(), 1)
        return totals[0].item() / n, 100.0 * totals[1].item() / n

    def _export_best(self) -> None:
        """The model (its EMA if enabled) in hrnet's weights format (written atomically)."""
        path = self.run_dir / "best.safetensors"
        self._check_finite({"model": self._eval_model().state_dict()}, path)
        if self.dist.is_main:
            metadata = {"epoch": str(self.epoch), "step": str(self.step), "metric": f"{self.best_metric:.4f}"}
            save_checkpoint(self._eval_model(), path, metadata=metadata)


def train(cfg: Config, *, resume: bool | str | os.PathLike = False, force: bool = False, quiet: bool = False,
          train_set: Dataset | None = None, val_set: Dataset | None = None) -> TrainResult:
    """Run the training ``cfg`` describes, holding ``output.dir`` locked for the run.

    ``resume=True`` continues from the newest checkpoint in ``output.dir``; a path continues from that
    checkpoint; ``"auto"`` continues from the newest checkpoint if there is one and otherwise starts
    (deleting what a previous attempt left without a checkpoint), the same command for the first start
    and every restart. Under a torchrun restart (``TORCHELASTIC_RESTART_COUNT`` > 0) no ``resume``
    means ``"auto"``. Otherwise ``output.dir`` must be empty or new, or with ``force`` hold only a
    previous run, which is deleted first. Rank 0 decides and tells the others, so all ranks agree.
    """
    check_device(cfg.train.device)
    dist = init_distributed(cfg.train.device, cfg.train.collective_timeout_s)
    if not resume and restart_count() > 0:
        resume = "auto"
    ckpt_dir = Path(cfg.output.dir) / "checkpoints"
    with contextlib.ExitStack() as stack:
        decision: Any = None
        if dist.is_main:
            try:
                path = None
                if resume == "auto":
                    found = checkpoints(ckpt_dir)
                    path = str(found[-1]) if found else None
                    stack.enter_context(claim_run_dir(Path(cfg.output.dir), resume=bool(found), force=not found))
                else:
                    stack.enter_context(claim_run_dir(Path(cfg.output.dir), resume=bool(resume), force=force))
                    if resume:
                        found = checkpoints(ckpt_dir) if resume is True else [Path(resume)]
                        if not found:
                            raise ResumeError(f"{ckpt_dir}: no checkpoint to resume from; pass --resume auto to "
                                              "start when there is none")
                        path = str(found[-1])
                decision = path
            except HRNetError as e:
                decision = e
        decision = broadcast_object(decision)
        if isinstance(decision, BaseException):
            raise decision
        state = None
        if decision is not None:  # the checkpoint brings the weights: do not fetch the starting ones
            cfg = replace(cfg, model=replace(cfg.model, pretrained=False, checkpoint=None))
            state = load_state(Path(decision))
        trainer = Trainer(cfg, train_set=train_set, val_set=val_set, quiet=quiet, source=str(decision),
                          global_batch=state.get("global_batch") if state else None)
        if state is not None:
            trainer.resume(decision, state)
        return trainer.fit()
