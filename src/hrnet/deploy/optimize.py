"""``hrnet optimize``: the fastest way to run a model on this machine, chosen by measurement, with its
agreement proven.

Which precision and runtime is fastest depends on the processor (bf16 is fast on one CPU with
AVX512_BF16 and slow on another), so instead of a table to read, every candidate this machine can run
(:data:`CANDIDATES`, less those it cannot: bf16 without native bf16, OpenVINO without its extra) is
built, timed in alternating rounds at batch 1 and at the batch size asked for (each round visits the
candidates in a rotated order, so a slow spell of a shared machine falls on all of them), and run on
held-out images next to the exact fp32 model: top-1 agreement with it, and accuracy where the
images are class folders. The fastest candidate whose agreement meets the threshold is chosen
(:func:`choose`).

The held-out images are ``val``, or a seeded share of ``calib`` that calibration never sees
(:func:`split_held_out`). ``OUT_DIR`` receives the chosen artefact (an .onnx file, or the weights for a
PyTorch backend), the reference fp32 weights, the manifest the funnel runs it from
(:mod:`hrnet.deploy.manifest`), and the report: ``report.json``, ``report.txt`` (a table) and
``report.png`` (speed against agreement, drawn with Pillow).
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from ..data import DatasetError, ImageDataset
from ..data.dataset import decode_sample
from ..errors import HRNetError
from ..fileio import atomic_write, display_path, exclusive_lock, refuse_same_file
from .bench import summarize, time_calls
from .engine import Classifier, build_model
from .export import CHECK_BATCHES, _check, export_onnx
from .manifest import MANIFEST, Manifest, write_manifest
from .openvino import openvino_available
from .quantize import calibration_files, quantize_onnx
from .runners import native_bf16_cpu, precision_problem

CANDIDATES: tuple[str, ...] = ("onnxruntime:fp32", "compile:fp32", "fused:bf16", "compile:bf16",
                               "onnxruntime:int8", "openvino:fp32", "openvino:int8", "openvino:bf16")
"""Every candidate, as ``BACKEND:PRECISION``; int8 is the calibrated ``hrnet quantize`` file."""
REFERENCE = "eager:fp32"  # what agreement is measured against: the model as built
OBJECTIVES = ("throughput", "latency")  # images/s at the batch size asked for, or at batch 1
HELD_OUT_FRACTION = 0.2
SPLIT_SEED = 0
LOCK = ".hrnet-optimize.lock"
FILES = {"fp32": "model.fp32.onnx", "int8": "model.int8.onnx"}  # the ONNX artefacts, by precision
WEIGHTS = "weights.safetensors"


class OptimizeError(HRNetError):
    """Optimization that cannot start (bad options, no candidate, an output folder in use) or chose nothing."""


@dataclass
class Measured:
    """One candidate: whether it was built (else ``error`` says why), its speed and its agreement."""

    label: str
    backend: str
    precision: str
    error: str | None = None
    setup_s: float = 0.0
    speed: dict[str, dict] = field(default_factory=dict)  # "1" and str(batch_size): BenchResult fields
    agreement: float | None = None  # top-1 agreement with the fp32 reference, percent
    accuracy: float | None = None  # top-1 accuracy, percent, where the images are labelled
    meets: bool = False


def runnable(specs: list[str] | tuple[str, ...] | None = None) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """The ``(backend, precision)`` candidates this machine can run out of ``specs`` (default
    :data:`CANDIDATES`), and for each one left out the reason. bf16 needs native bf16
    (:func:`~hrnet.deploy.runners.native_bf16_cpu`): emulated it is slower than fp32."""
    chosen, skipped = [], {}
    for spec in specs or CANDIDATES:
        if spec not in CANDIDATES:
            raise OptimizeError(f"unknown candidate {spec!r}; choose from: {', '.join(CANDIDATES)}")
        backend, precision = spec.split(":")
        if precision == "bf16" and not native_bf16_cpu():
            problem = "this CPU has no native bf16 (AVX512_BF16 or AMX)"
        elif backend == "onnxruntime" and importlib.util.find_spec("onnxruntime") is None:
            problem = "onnxruntime is not installed: pip install 'hrnet[onnx]'"
        elif precision == "int8":
            problem = precision_problem("fp32", backend, "cpu")
        else:
            problem = precision_problem(precision, backend, "cpu")
        if backend == "openvino" and not openvino_available():
            problem = "openvino is not installed: pip install 'hrnet[openvino]'"
        if problem is None:
            chosen.append((backend, precision))
        else:
            skipped[spec] = problem
    return chosen, skipped


def split_held_out(files: list, fraction: float = HELD_OUT_FRACTION, seed: int = SPLIT_SEED) -> tuple[list, list]:
    """``(calibration, held_out)``: a seeded share ``fraction`` of ``files`` (at least one) held out, the
    rest for calibration; disjoint, each in the input's order."""
    if len(files) < 2:
        raise OptimizeError(f"{len(files)} image(s): need at least 2 to hold some out of calibration (or pass --val)")
    order = list(range(len(files)))
    random.Random(seed).shuffle(order)
    held = set(order[:min(len(files) - 1, max(1, round(len(files) * fraction)))])
    return [f for i, f in enumerate(files) if i not in held], [f for i, f in enumerate(files) if i in held]


def speed_of(m: Measured, objective: str, batch_size: int) -> float:
    """The figure ``objective`` ranks by: images/s at ``batch_size`` (throughput) or at batch 1 (latency)."""
    return m.speed[str(batch_size if objective == "throughput" else 1)]["images_per_s"]


def choose(measured: list[Measured], min_agreement: float, objective: str, batch_size: int) -> Measured | None:
    """The fastest built candidate whose agreement is at least ``min_agreement`` percent (the first
    listed wins a tie), with ``meets`` set on every one that qualifies; None if none does."""
    best = None
    for m in measured:
        m.meets = m.error is None and m.agreement is not None and m.agreement >= min_agreement
        if m.meets and (best is None or speed_of(m, objective, batch_size) > speed_of(best, objective, batch_size)):
            best = m
    return best


class _Samples(Dataset):
    """``(file, label)`` pairs decoded through ``transform``; label -1 where unlabelled."""

    def __init__(self, samples: list[tuple[str, int]], transform):
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        return decode_sample(path, label, index, self.transform, False)


def _samples(root: str | os.PathLike, num_classes: int) -> tuple[list[tuple[str, int]], list[str] | None, bool]:
    """The images under ``root`` as ``(file, label)``, the class-folder names (when they name the
    model's classes) and whether they are labelled: class folders are, as ``hrnet eval`` reads them."""
    try:
        dataset = ImageDataset(root)
    except DatasetError:
        return [(f, -1) for f in calibration_files(root)], None, False
    if max(label for _, label in dataset.samples) >= num_classes:
        raise DatasetError(f"{root}: {len(dataset.classes)} class folders do not fit a model with {num_classes} classes")
    names = dataset.classes if dataset.layout == "folders" and len(dataset.classes) == num_classes else None
    return list(dataset.samples), names, True


def _prepare_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise OptimizeError(f"{display_path(out_dir)}: exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)


def _check_empty(out_dir: Path) -> None:
    if any(p.name != LOCK for p in out_dir.iterdir()):
        raise OptimizeError(f"{display_path(out_dir)}: not empty; choose a new folder (hrnet optimize writes a whole "
                            "folder: artefact, manifest and report)")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


def _build(backend: str, precision: str, model: nn.Module, files: dict[str, Path | None], size: int,
           crop_pct: float | None, threads: int | None) -> Classifier:
    """One candidate through the funnel: an ONNX artefact run by its backend, or the PyTorch backends
    on the model (openvino:bf16 included: OpenVINO's bf16 on its own export). OpenVINO fp32 is checked against the eager model as the ONNX export is."""
    if backend in ("onnxruntime", "openvino") and precision in FILES:
        clf = Classifier.build(model, checkpoint=files[precision], backend=backend, threads=threads,
                               input_size=size, crop_pct=crop_pct)
        if backend == "openvino" and precision == "fp32":
            _check(f"{backend}:{precision}", model, clf.runner, (size, size), CHECK_BATCHES)
        return clf
    return Classifier.build(model, device="cpu", backend=backend, precision=precision, threads=threads,
                            input_size=size, crop_pct=crop_pct)


def _time(built: dict[str, Classifier], measured: dict[str, Measured], size: int, batch_sizes: list[int], *,
          rounds: int, iters: int, warmup: int, progress: bool) -> None:
    """Time every built candidate in ``rounds`` alternating rounds (rotated order), one batch size after
    the other. Each visit starts with an untimed call: the runtime timed before leaves threads spinning
    and caches cold (onnxruntime's threads spin after a run; its batch-1 session is another pool than
    its batched one), which cost up to half the throughput of a small model's first calls."""
    labels = list(built)
    times = {(label, b): [] for label in labels for b in batch_sizes}
    with tqdm(total=rounds * len(labels) * len(batch_sizes), desc="time", unit="run", disable=not progress,
              dynamic_ncols=True) as bar:
        for b in batch_sizes:
            x = torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(b))
            for r in range(rounds):
                for label in labels[r % len(labels):] + labels[:r % len(labels)]:
                    run = built[label].runner
                    times[label, b] += time_calls(lambda: run(x), iters, warmup if r == 0 else 1)
                    bar.update(1)
    for label in labels:
        m = measured[label]
        m.speed = {str(b): asdict(summarize(m.backend, b, times[label, b], m.setup_s, None, m.precision))
                   for b in batch_sizes}


def _agreement(reference: Classifier, built: dict[str, Classifier], measured: dict[str, Measured],
               dataset: _Samples, labelled: bool, batch_size: int, progress: bool) -> tuple[int, float | None]:
    """Each built candidate's top-1 agreement with ``reference`` (and accuracy where ``labelled``) on
    ``dataset``, decoded once per batch for all; returns how many images were classified and the
    reference's accuracy (None unlabelled)."""
    agree = dict.fromkeys(built, 0)
    correct = dict.fromkeys([REFERENCE, *built], 0)
    n = 0
    for batch in reference.batches(dataset, batch_size, 0, strict=False, progress=progress, desc="agreement"):
        if not len(batch.indices):
            continue
        want = reference.logits(batch.images).argmax(1).cpu()
        n += len(want)
        correct[REFERENCE] += int((want == batch.labels).sum())
        for label, clf in built.items():
            got = clf.logits(batch.images).argmax(1).cpu()
            agree[label] += int((got == want).sum())
            correct[label] += int((got == batch.labels).sum())
    if not n:
        raise DatasetError(f"none of the {len(dataset)} held-out images could be decoded")
    for label, m in measured.items():
        if label in built:
            m.agreement = 100.0 * agree[label] / n
            m.accuracy = 100.0 * correct[label] / n if labelled else None
    return n, 100.0 * correct[REFERENCE] / n if labelled else None


def optimize(model_or_name: nn.Module | str, out_dir: str | os.PathLike, *, calib: str | os.PathLike,
             checkpoint: str | os.PathLike | None = None, val: str | os.PathLike | None = None,
             batch_size: int = 16, min_agreement: float = 99.5, objective: str = "throughput",
             candidates: list[str] | None = None, input_size: int | None = None, crop_pct: float | None = None,
             num_images: int = 256, rounds: int = 3, iters: int = 5, warmup: int = 2, threads: int | None = None,
             progress: bool = False) -> dict:
    """Build, time and check every candidate this machine can run (see the module docstring), choose
    the fastest whose top-1 agreement with fp32 is at least ``min_agreement`` percent, and write it
    to ``out_dir`` (absent or empty) with its manifest and report; returns the report.

    ``calib``: calibration images for int8 (a folder; a seeded share of it is held out for the
    agreement check unless ``val`` is given). ``objective``: rank by images/s at ``batch_size``
    (``"throughput"``) or at batch 1 (``"latency"``). ``candidates``: a subset of :data:`CANDIDATES`.
    ``rounds`` x ``iters`` timed batches per candidate and batch size, after ``warmup``.
    """
    if objective not in OBJECTIVES:
        raise OptimizeError(f"unknown objective {objective!r}; choose one of: {', '.join(OBJECTIVES)}")
    if not 0 <= min_agreement <= 100:
        raise OptimizeError(f"min_agreement is a percentage from 0 to 100, got {min_agreement}")
    for name, value in (("batch_size", batch_size), ("rounds", rounds), ("iters", iters), ("num_images", num_images)):
        if value < 1:
            raise OptimizeError(f"{name} must be at least 1, got {value}")
    out_dir = Path(out_dir)
    refuse_same_file(out_dir, checkpoint, calib, val, error=OptimizeError)
    todo, skipped = runnable(candidates)
    if not todo:
        raise OptimizeError("no candidate can run on this machine: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    model = build_model(model_or_name, checkpoint, progress=progress).cpu().eval()
    record = getattr(model, "pretrained_cfg", None)
    if record is None:
        raise OptimizeError("the model has no zoo record (pretrained_cfg): build it with hrnet.create_model")
    size = input_size or model.eval_cfg.input_size
    calib_samples, names, labelled = _samples(calib, model.num_classes)
    if val is not None:
        held, names_val, labelled = _samples(val, model.num_classes)
        names = names_val or names
    else:
        calib_samples, held = split_held_out(calib_samples)
    _prepare_out_dir(out_dir)
    with exclusive_lock(out_dir / LOCK, display_path(out_dir), error=OptimizeError):
        _check_empty(out_dir)
        work = Path(tempfile.mkdtemp(prefix=".work-", dir=out_dir))
        try:
            report = _run(model, record.name, out_dir, work, todo, skipped, [f for f, _ in calib_samples], held,
                          names, labelled, size=size, crop_pct=crop_pct, batch_size=batch_size,
                          min_agreement=min_agreement, objective=objective, num_images=num_images, rounds=rounds,
                          iters=iters, warmup=warmup, threads=threads, progress=progress, val=val is not None)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    (out_dir / LOCK).unlink(missing_ok=True)
    return report


def _run(model: nn.Module, name: str, out_dir: Path, work: Path, todo: list[tuple[str, str]], skipped: dict[str, str],
         calib_files: list[str], held: list[tuple[str, int]], names: list[str] | None, labelled: bool, *, size: int,
         crop_pct: float | None, batch_size: int, min_agreement: float, objective: str, num_images: int,
         rounds: int, iters: int, warmup: int, threads: int | None, progress: bool, val: bool) -> dict:
    """:func:`optimize` once the output folder is held: build, time, check, choose, write."""
    import time

    from ..weights import save_checkpoint

    save_checkpoint(model, out_dir / WEIGHTS)  # the reference, and the artefact of the PyTorch backends
    files: dict[str, Path | None] = dict.fromkeys(FILES)
    precisions = {p for _, p in todo}
    onnx_needed = any(b in ("onnxruntime", "openvino") for b, _ in todo)
    measured = {f"{b}:{p}": Measured(f"{b}:{p}", b, p) for b, p in todo}
    built: dict[str, Classifier] = {}
    if onnx_needed:
        try:  # checked against the eager model, as 'hrnet export' checks it
            files["fp32"] = export_onnx(model, work / FILES["fp32"], input_size=(size, size))
        except HRNetError as e:
            for m in measured.values():
                if m.backend in ("onnxruntime", "openvino"):
                    m.error = f"ONNX export failed: {e}"
    if "int8" in precisions and files["fp32"] is not None:
        try:
            files["int8"] = quantize_onnx(model, calib_files, work / FILES["int8"], num_images=num_images,
                                          input_size=size, progress=False)
        except HRNetError as e:
            for m in measured.values():
                if m.precision == "int8":
                    m.error = str(e)
    reference = Classifier.build(model, device="cpu", backend="eager", input_size=size, crop_pct=crop_pct)
    for label, m in tqdm(measured.items(), desc="build", unit="candidate", disable=not progress, dynamic_ncols=True):
        if m.error:
            continue
        start = time.perf_counter()
        try:
            clf = _build(m.backend, m.precision, model, files, size, crop_pct, threads)
            clf.runner(torch.zeros(1, 3, size, size))  # first run: compilation, lazy sessions
        except Exception as e:  # a candidate that fails (a compiler missing, a runtime refusing) is reported, not fatal
            m.error = _first_line(e)
            continue
        m.setup_s = time.perf_counter() - start
        built[label] = clf
    if not built:
        raise OptimizeError("no candidate could be built: " + "; ".join(f"{k}: {m.error}" for k, m in measured.items()))
    batch_sizes = sorted({1, batch_size})
    _time(built, measured, size, batch_sizes, rounds=rounds, iters=iters, warmup=warmup, progress=progress)
    dataset = _Samples(held, reference.transform)
    n, reference_accuracy = _agreement(reference, built, measured, dataset, labelled, batch_size, progress)
    best = choose(list(measured.values()), min_agreement, objective, batch_size)
    if best is None:
        top = max((m for m in measured.values() if m.agreement is not None), key=lambda m: m.agreement)
        raise OptimizeError(f"no candidate reaches {min_agreement} % top-1 agreement on {n} held-out images "
                            f"(best: {top.label}, {top.agreement:.2f} %); lower --min-agreement")
    artefact = WEIGHTS
    if best.backend in ("onnxruntime", "openvino"):
        artefact = FILES["int8" if best.precision == "int8" else "fp32"]
        os.replace(files["int8" if best.precision == "int8" else "fp32"], out_dir / artefact)
    report = {
        "model": name, "input_size": size, "crop_pct": crop_pct, "batch_size": batch_size,
        "min_agreement": min_agreement, "objective": objective, "reference": REFERENCE,
        "held_out": {"images": n, "source": "val" if val else f"a seeded {HELD_OUT_FRACTION:.0%} of calib",
                     "labelled": labelled},
        "calibration_images": min(num_images, len(calib_files)) if files["int8"] else 0,
        "reference_accuracy": reference_accuracy, "timing": {"rounds": rounds, "iters": iters, "warmup": warmup,
                                               "threads": threads, "batch_sizes": batch_sizes},
        "machine": {"cpus": os.cpu_count(), "native_bf16": native_bf16_cpu()},
        "candidates": [asdict(m) for m in measured.values()],
        "skipped": skipped, "chosen": best.label, "artefact": artefact,
    }
    write_report(out_dir, report)
    write_manifest(out_dir, Manifest(model=name, backend=best.backend, precision=best.precision, artefact=artefact,
                                     weights=WEIGHTS, input_size=size, crop_pct=crop_pct, classes=names))
    return report


def report_table(report: dict) -> str:
    """The candidates as a text table: speed at each batch size (and against onnxruntime fp32),
    agreement, accuracy, and which was chosen."""
    sizes = [str(b) for b in report["timing"]["batch_sizes"]]
    base = next((c for c in report["candidates"] if c["label"] == "onnxruntime:fp32" and c["speed"]), None)
    header = ["candidate", *[f"img/s b{b}" for b in sizes], "vs onnxruntime", "agreement %", "accuracy %", ""]
    rows = []
    for c in report["candidates"]:
        if c["error"]:
            rows.append([c["label"], *["-"] * len(sizes), "-", "-", "-", f"not built: {c['error'][:60]}"])
            continue
        speeds = [c["speed"][b]["images_per_s"] for b in sizes]
        ratio = f"{speeds[-1] / base['speed'][sizes[-1]]['images_per_s']:.2f}x" if base else "-"
        mark = "chosen" if c["label"] == report["chosen"] else ("" if c["meets"] else "below threshold")
        rows.append([c["label"], *[f"{s:.1f}" for s in speeds], ratio, f"{c['agreement']:.2f}",
                     "-" if c["accuracy"] is None else f"{c['accuracy']:.2f}", mark])
    for spec, why in report["skipped"].items():
        rows.append([spec, *["-"] * len(sizes), "-", "-", "-", f"skipped: {why[:60]}"])
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def report_text(report: dict) -> str:
    """``report.txt``: the settings, the table, the choice."""
    held = report["held_out"]
    acc = report["reference_accuracy"]
    return "\n".join([
        f"hrnet optimize {report['model']}: input {report['input_size']}x{report['input_size']}, "
        f"batch 1 and {report['batch_size']}, ranked by {report['objective']}",
        f"agreement: top-1 against {report['reference']} on {held['images']} held-out images ({held['source']})"
        + (f"; reference accuracy {acc:.2f} %" if acc is not None else ""),
        "", report_table(report), "",
        f"chosen: {report['chosen']} (the fastest with at least {report['min_agreement']} % agreement), "
        f"running {report['artefact']}", ""])


def draw_report(report: dict, width: int = 720, height: int = 480):
    """``report.png``: images/s at the batch size (y) against top-1 agreement (x), one dot per built
    candidate, the threshold as a vertical line, the chosen one in red. A Pillow image."""
    from PIL import Image, ImageDraw

    batch = str(report["timing"]["batch_sizes"][-1])
    points = [(c["label"], c["agreement"], c["speed"][batch]["images_per_s"])
              for c in report["candidates"] if not c["error"]]
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 70, width - 30, 40, height - 50
    xs = [a for _, a, _ in points] + [report["min_agreement"], 100.0]
    x0, x1 = min(xs) - 0.5, 100.0 + 0.25
    y1 = max(s for _, _, s in points) * 1.15 or 1.0

    def at(a: float, s: float) -> tuple[float, float]:
        return left + (a - x0) / (x1 - x0) * (right - left), bottom - s / y1 * (bottom - top)

    d.rectangle([left, top, right, bottom], outline="black")
    for i in range(5):
        a, s = x0 + (x1 - x0) * i / 4, y1 * i / 4
        d.text((at(a, 0)[0] - 15, bottom + 6), f"{a:.2f}", fill="black")
        d.text((8, at(x0, s)[1] - 6), f"{s:.1f}", fill="black")
    threshold = at(report["min_agreement"], 0)[0]
    for y in range(top, bottom, 8):
        d.line([threshold, y, threshold, y + 4], fill="grey")
    d.text((left, 12), f"{report['model']}: images/s at batch {batch} against top-1 agreement (%) "
                       f"with {report['reference']}", fill="black")
    d.text((right - 170, bottom + 26), "top-1 agreement %", fill="black")
    for label, a, s in points:
        x, y = at(a, s)
        colour = "red" if label == report["chosen"] else "navy"
        d.ellipse([x - 5, y - 5, x + 5, y + 5], fill=colour)
        tx = x + 8 if x < (left + right) / 2 else x - 8 - d.textlength(label)  # keep the name inside the frame
        d.text((tx, y - 7), label, fill=colour)
    return img


def write_report(out_dir: Path, report: dict) -> None:
    """report.json, report.txt and report.png in ``out_dir``, each written atomically."""
    text = json.dumps(report, indent=2) + "\n"
    atomic_write(out_dir / "report.json", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    atomic_write(out_dir / "report.txt", lambda tmp: Path(tmp).write_text(report_text(report), encoding="utf-8"))
    image = draw_report(report)
    atomic_write(out_dir / "report.png", lambda tmp: image.save(tmp, format="PNG"))


__all__ = ["CANDIDATES", "MANIFEST", "Measured", "OptimizeError", "choose", "optimize", "runnable", "split_held_out"]
