"""The one funnel for inference: :class:`Classifier` builds what runs (a model or an .onnx file, backend,
precision, threads, device) and classifies a stream of decoded batches. ``predict``, ``predict --output``,
``eval``, ``compare``, ``bench``, ``cam`` and ``serve`` all build one, so an option added here works
in every one of them."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from ..builder import create_model
from ..data import (Batch, EvalTransform, ImageList, ImageReadError, class_names, default_workers, eval_transform,
                    inference_loader)
from ..distributed import check_device
from ..errors import UsageError
from ..models import resolve
from .manifest import is_optimize_dir, read_manifest
from .openvino import OpenVINORunner
from .ort import OnnxRuntimeRunner, is_onnx_file, onnx_info, onnx_metadata
from .runners import Runner, check_compile_mode, make_runner

PathLike = str | os.PathLike
LIVE_TENSORS = 4  # stem-sized float32 tensors alive at once in a forward pass (64 channels at half resolution)
QUEUED_BATCHES = 5  # decoded input batches held at once: the one running and the loader's prefetch


def available_memory(device: str) -> int | None:
    """Bytes free for activations on ``device``: MemAvailable of /proc/meminfo on CPU, the free GPU memory
    on CUDA; None where it cannot be told."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def batch_memory(batch_size: int, side: int) -> int:
    """Bytes a batch of ``batch_size`` images of ``side`` x ``side`` needs, estimated from the per-image
    activation size: the stem's output (64 channels at half resolution, float32) times LIVE_TENSORS, plus
    the decoded inputs the loader queues (about 16 MB an image at 224)."""
    half = (side + 1) // 2
    return batch_size * (64 * half * half * 4 * LIVE_TENSORS + 3 * side * side * 4 * QUEUED_BATCHES)


def build_model(model_or_name: nn.Module | str, checkpoint: PathLike | None = None, *,
                progress: bool = False) -> nn.Module:
    """A model object as is, or a zoo name with ``checkpoint`` (else its published weights, with a
    download bar if ``progress``): the one place a command turns NAME [--checkpoint] into a model. An
    ``hrnet optimize`` directory gives its reference fp32 weights."""
    if is_optimize_dir(checkpoint):
        checkpoint = read_manifest(checkpoint)[2]
    if not isinstance(model_or_name, nn.Module):
        return create_model(model_or_name, pretrained=checkpoint is None, checkpoint=checkpoint, progress=progress)
    if checkpoint is not None:
        raise TypeError("checkpoint applies to a model name, not to a built model")
    return model_or_name


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def check_topk(topk: int) -> None:
    if topk < 1:
        raise ValueError("topk must be at least 1")


def topk_records(probs: torch.Tensor, labels: list[str], k: int) -> list[list[dict]]:
    """``[{"index", "label", "score"}, ...]`` of the ``k`` most probable classes, per row."""
    scores, idx = probs.topk(min(k, probs.shape[1]), dim=1)
    return [[{"index": int(i), "label": labels[int(i)], "score": float(s)} for s, i in zip(srow, irow)]
            for srow, irow in zip(scores, idx)]


@dataclass(frozen=True)
class DeviceDefaults:
    """What a command picks on a device when the user names nothing (``hrnet bench`` prints them)."""

    device: str
    backend: str  # predict, eval, cam, bench's first row; serve: serving_backend
    batch_size: int  # eval's --batch-size: a throughput command
    workers: int  # decoding processes (data.loader.default_workers)


def device_defaults(device: str) -> DeviceDefaults:
    """The settings a user would expect on ``device``. CPU: the eager model (the reference), batch 32,
    decoding in-process. GPU: the fused model (BN folded, channels_last: the same logits to float
    rounding, no compile warm-up), batch 256 (a GPU needs large batches to fill; eval refuses a batch
    the device cannot hold), up to 8 decoding processes. Precision stays fp32 (exact) unless asked:
    bf16 is the recommended GPU precision (docs/guides/gpu.md)."""
    if device.startswith("cuda"):
        return DeviceDefaults(device, "fused", 256, default_workers(device))
    return DeviceDefaults(device, "eager", 32, default_workers(device))


@dataclass
class Classifier:
    """A model ready for inference: where batches go, how images are prepared, what outputs mean."""

    model: nn.Module | None  # None for an ONNX file: onnxruntime holds the weights
    device: str
    transform: EvalTransform
    labels: list[str]
    runner: Runner
    precision: str = "fp32"  # what runs: asked for, or (an .onnx file) what the file was written in
    names: tuple[str, ...] | None = None  # the model's own class names (``labels`` falls back to indices)

    @classmethod
    def build(cls, model_or_name: nn.Module | str, *, checkpoint: PathLike | None = None,
              device: str | None = None, input_size: int | None = None, crop_pct: float | None = None,
              backend: str | None = None, precision: str | None = None, threads: int | None = None,
              progress: bool = False, graph_size: tuple[int, int] | None = None,
              compile_mode: str | None = None) -> Classifier:
        """A model object as is, or a zoo name with ``checkpoint`` (else its published weights, with a
        download bar if ``progress``), on ``device`` (cpu, cuda, cuda:N; default cuda if available;
        checked first, a one-line DeviceError) run by ``backend`` (see :data:`hrnet.deploy.BACKENDS`,
        default :func:`device_defaults`'s: eager on CPU, fused on a GPU) at ``precision``
        (:data:`hrnet.deploy.PRECISIONS`, default fp32); ``compile_mode``: the compile backend's
        torch.compile mode (:data:`hrnet.deploy.runners.COMPILE_MODES`).

        A ``checkpoint`` ending in ``.onnx`` (``hrnet export`` or ``hrnet quantize``) runs with
        onnxruntime on CPU, with the input size, preprocessing and classes its metadata records;
        ``precision`` then checks the file (``int8`` insists on a quantized file). ``threads``: CPU
        threads for the model (``torch.set_num_threads``, and onnxruntime's sessions; not set for a
        model on a GPU, whose CPU threads only feed it). ``graph_size``:
        the (H, W) the compile backend is warmed up on and the onnxruntime graph exported for
        (default: the crop; ``hrnet bench`` measures other shapes).

        A ``checkpoint`` that is an ``hrnet optimize`` directory runs what it chose (its manifest's
        backend, precision, file, evaluation settings and class names); a ``backend`` or ``precision``
        other than the chosen one is refused.
        """
        if is_optimize_dir(checkpoint):
            return cls._from_optimized(model_or_name, checkpoint, device=device, input_size=input_size,
                                       crop_pct=crop_pct, backend=backend, precision=precision, threads=threads,
                                       graph_size=graph_size, compile_mode=compile_mode)
        if is_onnx_file(checkpoint):
            if threads:
                torch.set_num_threads(threads)
            return cls._from_onnx(model_or_name, checkpoint, input_size=input_size, crop_pct=crop_pct,
                                  backend=backend, precision=precision, threads=threads)
        device = check_device(device)  # before a download or a build
        backend = backend or device_defaults(device).backend
        check_compile_mode(compile_mode, backend)
        if threads and device == "cpu":
            torch.set_num_threads(threads)
        model = build_model(model_or_name, checkpoint, progress=progress).to(device).eval()
        transform = eval_transform(model, input_size, crop_pct)
        precision = precision or "fp32"
        runner = make_runner(model, backend, precision=precision, threads=threads, compile_mode=compile_mode,
                             input_size=graph_size or (transform.input_size, transform.input_size))
        return cls(model, device, transform, class_names(model), runner, precision,
                   getattr(model, "class_names", None))

    @classmethod
    def _from_onnx(cls, model_or_name: nn.Module | str, path: PathLike, *, input_size: int | None,
                   crop_pct: float | None, backend: str | None, precision: str | None,
                   threads: int | None) -> Classifier:
        """An hrnet ONNX file run by onnxruntime on the CPU (whatever the device), checked against the
        model it is meant to be (a zoo name, or a model object's record and classes); options that
        cannot apply to it are refused. No PyTorch weights are loaded."""
        if isinstance(model_or_name, nn.Module):
            record, classes = getattr(model_or_name, "pretrained_cfg", None), model_or_name.num_classes
        else:
            record, classes = resolve(model_or_name), None  # an unknown name fails as it would without the file
        if backend not in (None, "onnxruntime", "openvino"):
            raise UsageError(f"{path}: an ONNX file runs with the onnxruntime backend, not {backend} "
                             "(or with openvino)")
        if not os.path.isfile(path):
            raise UsageError(f"{path}: ONNX file not found")
        if backend == "openvino":  # the file's precision sets OpenVINO's (a missing extra: one line)
            runner = OpenVINORunner(path, threads, onnx_metadata(path).get("hrnet.precision", "fp32"))
        else:
            runner = OnnxRuntimeRunner(path, threads)  # a missing extra or a damaged file: one line
        cfg, size, classes, names, precision = onnx_info(path, runner.metadata, record=record, num_classes=classes,
                                                  precision=precision, input_size=input_size)
        return cls(None, "cpu", eval_transform(cfg, size, crop_pct), class_names(classes, names), runner, precision,
                   names)

    @classmethod
    def _from_optimized(cls, model_or_name: nn.Module | str, directory: PathLike, *, backend: str | None,
                        precision: str | None, input_size: int | None, crop_pct: float | None,
                        **build) -> Classifier:
        """What an ``hrnet optimize`` directory chose, checked against the model named and the options given."""
        manifest, artefact, weights = read_manifest(directory)
        name = model_or_name.pretrained_cfg.name if isinstance(model_or_name, nn.Module) and getattr(
            model_or_name, "pretrained_cfg", None) else model_or_name
        if isinstance(name, str) and resolve(name).name != manifest.model:
            raise UsageError(f"{directory}: optimized for {manifest.model}, not {resolve(name).name}")
        for option, asked, chosen in (("--backend", backend, manifest.backend),
                                      ("--precision", precision, manifest.precision)):
            if asked not in (None, chosen):
                raise UsageError(f"{directory}: hrnet optimize chose {manifest.backend}:{manifest.precision}; "
                                 f"{option} {asked} does not apply (pass the weights, not the directory, to choose)")
        settings = dict(input_size=input_size or manifest.input_size, crop_pct=crop_pct or manifest.crop_pct,
                        backend=manifest.backend, precision=manifest.precision)
        if is_onnx_file(artefact):
            clf = cls._from_onnx(manifest.model, artefact, threads=build.get("threads"), **settings)
        else:
            build["device"] = build.get("device") or "cpu"  # what was measured, unless a device is named
            clf = cls.build(manifest.model, checkpoint=artefact, **settings, **build)
        if manifest.classes and len(manifest.classes) == len(clf.labels):
            clf.labels, clf.names = list(manifest.classes), tuple(manifest.classes)
        return clf

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.runner(images.to(self.device, non_blocking=True)).float()

    def batches(self, dataset, batch_size: int, workers: int | None, *, strict: bool,
                progress: bool, desc: str) -> Iterator[Batch]:
        """The dataset's batches in order, with a progress bar over images; ``strict`` raises the
        first unreadable file (raised here, not in a worker, so the message stays one line). The batch
        is capped at the number of images, and one the machine cannot hold is refused up front."""
        batch_size = max(1, min(batch_size, len(dataset)))
        need, free = batch_memory(batch_size, self.transform.input_size), available_memory(self.device)
        if free is not None and need > free:
            raise UsageError(f"--batch-size {batch_size}: a batch of {batch_size} images at "
                             f"{self.transform.input_size}x{self.transform.input_size} needs about {_size(need)}, "
                             f"and {self.device} has {_size(free)} available; choose a smaller --batch-size")
        loader = inference_loader(dataset, batch_size, workers, device=self.device)
        with tqdm(total=len(dataset), unit="img", desc=desc, disable=not progress, dynamic_ncols=True) as bar:
            for batch in loader:
                if strict and batch.failed:
                    raise ImageReadError(batch.failed[0].error)
                bar.update(len(batch.indices) + len(batch.failed))
                yield batch

    def predictions(self, files: list[str], *, topk: int, batch_size: int, workers: int | None,
                    strict: bool, progress: bool) -> Iterator[tuple[int, dict]]:
        """``(i, record)`` for each of ``files`` in order: ``{"file", "topk": [{"index", "label",
        "score"}]}`` with softmax probabilities, or ``{"file", "error"}`` for a file that could not
        be read (raised instead when ``strict``)."""
        check_topk(topk)
        dataset = ImageList(files, transform=self.transform)
        for batch in self.batches(dataset, batch_size, workers, strict=strict, progress=progress, desc="predict"):
            results = {bad.index: {"file": bad.file, "error": bad.error} for bad in batch.failed}
            if len(batch.indices):
                probs = self.logits(batch.images).softmax(dim=1).cpu()
                for i, top in zip(batch.indices.tolist(), topk_records(probs, self.labels, topk)):
                    results[i] = {"file": files[i], "topk": top}
            yield from sorted(results.items())
