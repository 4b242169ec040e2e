"""hrnet against timm on one GPU, in the same process: inference, training and end-to-end eval.

    python benchmarks/bench_gpu.py --json figures.json            # one GPU (benchmarks/gpu_check.sh runs it)
    python benchmarks/bench_gpu.py --device cpu --quick           # the script itself, on any machine

Inference: hrnet-w18 and hrnet-w48 at batch 1, 64 and 256 in fp16 and bf16; hrnet's ``fused`` and
``compile`` backends (and ``compile`` with ``reduce-overhead``, CUDA graphs, at batch 1) against timm's
model eager under autocast and timm's model through ``torch.compile`` in channels_last under
autocast, the same precision. The candidates of one setting are timed round by round (A B C D, A B C
D, ...), so a clock or thermal drift hits them alike; a figure is the median round.

Training: images/s of hrnet's Trainer step with the recipe's switches (bf16, channels_last, with and
without ``train.compile``) against a plain AMP channels_last timm loop (SGD, the same batch of the same
data), and both loss curves.

Eval: ``hrnet.evaluate`` on a folder of JPEGs made from scikit-image's photos (resized to ImageNet-like
sizes, re-encoded), with every CPU core as a decoding worker, against the model-only throughput of the
same backend, precision and batch.

Work is done in priority order (the targets of issue 17 first) until ``--budget-s`` runs out; what did
not fit is listed under ``"skipped"`` in the JSON, never estimated. No figure is written anywhere else.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from hrnet import create_model  # noqa: E402
from hrnet.data import imagenet_wnids  # noqa: E402
from hrnet.deploy.bench import time_calls  # noqa: E402
from hrnet.deploy.engine import Classifier, device_defaults  # noqa: E402
from hrnet.distributed import check_device  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TIMM = {"hrnet-w18": "hrnet_w18", "hrnet-w48": "hrnet_w48", "hrnet-w18-small": "hrnet_w18_small"}


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds
        self.skipped: list[str] = []

    def allows(self, what: str) -> bool:
        if time.monotonic() < self.end:
            return True
        self.skipped.append(what)
        print(f"skipped (time budget): {what}", file=sys.stderr, flush=True)
        return False


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---- inference ------------------------------------------------------------------------------------


def timm_runners(name: str, device: str, precision: str, size: int, compiled: bool) -> dict:
    """timm's model eager under autocast (NCHW), and torch.compile + channels_last under autocast."""
    import timm

    model = timm.create_model(TIMM[name], pretrained=False).to(device).eval()
    dtype = DTYPES[precision]
    kind = torch.device(device).type

    def amp(fn):
        def run(x):
            with torch.inference_mode(), torch.autocast(kind, dtype=dtype, enabled=precision != "fp32"):
                return fn(x)
        return run

    out = {"timm:eager": amp(model)}
    if compiled:
        cl = timm.create_model(TIMM[name], pretrained=False).to(device).eval().to(memory_format=torch.channels_last)
        fast = torch.compile(cl)
        out["timm:compile+cl"] = amp(lambda x: fast(x.contiguous(memory_format=torch.channels_last)))
        out["timm:compile+cl"](torch.zeros(1, 3, size, size, device=device))
    return out


def hrnet_runners(name: str, device: str, precision: str, size: int, batch: int, compiled: bool) -> dict:
    model = create_model(name, pretrained=False).eval()
    out = {}
    for label, backend, mode in [("hrnet:fused", "fused", None), ("hrnet:compile", "compile", None),
                                 ("hrnet:compile:reduce-overhead", "compile", "reduce-overhead")]:
        if (backend == "compile" and not compiled) or (mode and not (device.startswith("cuda") and batch == 1)):
            continue
        out[label] = Classifier.build(model, device=device, backend=backend, precision=precision,
                                      graph_size=(size, size), compile_mode=mode).runner
    return out


def measure_round_robin(runners: dict, x: torch.Tensor, device: str, rounds: int, iters: int) -> dict:
    for run in runners.values():  # warm-up: compile this shape, fill caches
        time_calls(lambda: run(x), 1, 2, device)
    per_round = {k: [] for k in runners}
    for _ in range(rounds):
        for label, run in runners.items():
            per_round[label].append(statistics.median(time_calls(lambda: run(x), iters, 0, device)))
    return {k: {"latency_ms": 1e3 * statistics.median(v), "images_per_s": len(x) / statistics.median(v)}
            for k, v in per_round.items()}


def inference(settings, device: str, size: int, rounds: int, iters: int, deadline: Deadline,
              compiled: bool) -> list[dict]:
    rows = []
    built: dict = {}
    for name, precision, batch in settings:
        what = f"inference {name} {precision} batch {batch}"
        if not deadline.allows(what):
            continue
        print(what, file=sys.stderr, flush=True)
        key = (name, precision)
        if key not in built:
            built.clear()
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
            built[key] = timm_runners(name, device, precision, size, compiled)
        runners = {**hrnet_runners(name, device, precision, size, batch, compiled), **built[key]}
        x = torch.randn(batch, 3, size, size, device=device)
        for label, r in measure_round_robin(runners, x, device, rounds, iters).items():
            rows.append({"model": name, "precision": precision, "batch": batch, "candidate": label, **r})
        del runners
    return rows


def ratios(rows: list[dict]) -> list[dict]:
    """hrnet's best over timm's best, per model, precision and batch (throughput; latency at batch 1)."""
    out = []
    for key in sorted({(r["model"], r["precision"], r["batch"]) for r in rows}):
        group = [r for r in rows if (r["model"], r["precision"], r["batch"]) == key]
        h = max((r for r in group if r["candidate"].startswith("hrnet")), key=lambda r: r["images_per_s"])
        t = max((r for r in group if r["candidate"].startswith("timm")), key=lambda r: r["images_per_s"])
        out.append({"model": key[0], "precision": key[1], "batch": key[2], "hrnet_best": h["candidate"],
                    "timm_best": t["candidate"], "throughput_ratio": h["images_per_s"] / t["images_per_s"],
                    "latency_ratio": h["latency_ms"] / t["latency_ms"]})
    return out


# ---- training -------------------------------------------------------------------------------------


class Tensors:
    """In-memory training samples: the same data for both loops."""

    def __init__(self, n: int, size: int, classes: int = 1000, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 3, size, size, generator=g)
        self.labels = torch.randint(0, classes, (n,), generator=g)
        self.classes = [str(i) for i in range(classes)]


def hrnet_training(name: str, data: Tensors, device: str, batch: int, steps: int, warmup: int, switches: list[str],
                   run_dir: Path) -> dict:
    from hrnet.training.config import load_config
    from hrnet.training.train import Trainer

    class Samples:
        classes = data.classes

        def __len__(self):
            return len(data.labels)

        def __getitem__(self, i):
            from hrnet.data import Sample
            return Sample(data.images[i], int(data.labels[i]), i)

    cfg = load_config(None, [f"model.name={name}", "model.pretrained=false", f"data.input_size={data.images.shape[-1]}",
                             f"data.batch_size={batch}", "data.workers=0", "schedule.epochs=1", "optim.lr=0.1",
                             f"train.device={device}", f"output.dir={run_dir}", *switches])
    trainer = Trainer(cfg, quiet=True, train_set=Samples())
    trainer.train_model.train()
    losses, times = [], []
    for step in range(warmup + steps):
        i = (step * batch) % (len(data.labels) - batch + 1)
        x = data.images[i:i + batch].to(device, non_blocking=True)  # copied before the clock, as in timm's loop
        y = data.labels[i:i + batch].to(device, non_blocking=True)
        sync(device)
        start = time.perf_counter()
        stats = trainer._train_step(x, y)  # the trainer's own step: autocast, scaler, scheduler, collectives
        sync(device)
        if step >= warmup:
            times.append(time.perf_counter() - start)
        losses.append(stats[0].item() / stats[2].item())
    return {"images_per_s": batch / statistics.median(times), "losses": losses}


def timm_training(name: str, data: Tensors, device: str, batch: int, steps: int, warmup: int, precision: str) -> dict:
    """The plain loop: timm's model in channels_last, autocast, SGD, no scaler for bf16."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(TIMM[name], pretrained=False).to(device).to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1 * batch / 256, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler(torch.device(device).type, enabled=precision == "fp16")
    kind = torch.device(device).type
    losses, times = [], []
    for step in range(warmup + steps):
        i = (step * batch) % (len(data.labels) - batch + 1)
        x = data.images[i:i + batch].to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        y = data.labels[i:i + batch].to(device, non_blocking=True)
        sync(device)
        start = time.perf_counter()
        with torch.autocast(kind, dtype=DTYPES[precision], enabled=precision != "fp32"):
            loss = nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sync(device)
        if step >= warmup:
            times.append(time.perf_counter() - start)
        losses.append(loss.item())
    return {"images_per_s": batch / statistics.median(times), "losses": losses}


def training(name: str, device: str, precision: str, size: int, batch: int, steps: int, warmup: int,
             deadline: Deadline, tmp: Path, compiled: bool) -> list[dict]:
    data = Tensors(max(4 * batch, batch + 1), size)
    rows = []
    amp = [] if precision == "fp32" else [f"train.amp={precision}"]
    for label, fn in [("timm:amp+cl", lambda: timm_training(name, data, device, batch, steps, warmup, precision)),
                      ("hrnet:amp+cl", lambda: hrnet_training(name, data, device, batch, steps, warmup,
                                                              [*amp, "train.channels_last=true"], tmp / "a")),
                      ("hrnet:amp+cl+compile", lambda: hrnet_training(name, data, device, batch, steps, warmup,
                                                                      [*amp, "train.channels_last=true",
                                                                       "train.compile=true"], tmp / "b"))]:
        if label.endswith("compile") and not compiled:
            continue
        what = f"training {name} {precision} batch {batch} {label}"
        if not deadline.allows(what):
            continue
        print(what, file=sys.stderr, flush=True)
        r = fn()
        rows.append({"model": name, "precision": precision, "batch": batch, "candidate": label,
                     "images_per_s": r["images_per_s"], "losses": r["losses"],
                     "mean_loss_last_20": statistics.fmean(r["losses"][-20:])})
    return rows


# ---- eval end to end ------------------------------------------------------------------------------


def _write_jpegs(job: tuple[int, int, str, int, int]) -> None:
    from PIL import Image
    from skimage import data as skdata

    start, count, root, classes, seed = job
    names = ["astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "hubble_deep_field", "immunohistochemistry"]
    photos = []
    for n in names:
        try:
            photos.append(Image.fromarray(getattr(skdata, n)()).convert("RGB"))
        except Exception:  # not shipped with this scikit-image
            pass
    rng = random.Random(seed + start)
    for i in range(start, start + count):
        img = photos[i % len(photos)]
        w, h = rng.choice([(500, 375), (375, 500), (500, 333), (640, 480), (500, 500), (400, 300)])
        left, top = rng.randint(0, img.width // 4), rng.randint(0, img.height // 4)
        crop = img.crop((left, top, left + img.width * 3 // 4, top + img.height * 3 // 4)).resize((w, h))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        folder = Path(root) / imagenet_wnids()[i % classes]  # an ImageNet tree: the 1000-class model's own classes
        folder.mkdir(parents=True, exist_ok=True)
        crop.save(folder / f"{i:06d}.jpg", quality=rng.randint(75, 95))


def make_folder(root: Path, n: int, workers: int, classes: int = 10) -> Path:
    chunk = max(1, n // max(workers, 1))
    jobs = [(s, min(chunk, n - s), str(root), classes, 0) for s in range(0, n, chunk)]
    with ProcessPoolExecutor(max(workers, 1)) as pool:
        list(pool.map(_write_jpegs, jobs))
    return root


def end_to_end(name: str, device: str, precision: str, batch: int, images: int, workers: int, deadline: Deadline,
               tmp: Path, iters: int) -> list[dict]:
    from hrnet.inference.evaluate import evaluate

    what = f"eval {name} {precision} {images} JPEGs"
    if not deadline.allows(what):
        return []
    print(what, file=sys.stderr, flush=True)
    folder = make_folder(tmp / "jpegs", images, workers)
    backend = device_defaults(device).backend if device.startswith("cuda") else "fused"
    model = create_model(name, pretrained=False).eval()
    clf = Classifier.build(model, device=device, backend=backend, precision=precision)
    x = torch.randn(batch, 3, clf.transform.input_size, clf.transform.input_size, device=device)
    model_only = batch / statistics.median(time_calls(lambda: clf.runner(x), iters, 2, device))
    del clf
    result = evaluate(model, folder, device=device, backend=backend, precision=precision, batch_size=batch,
                      workers=workers)
    return [{"model": name, "precision": precision, "batch": batch, "backend": backend, "images": result["n"],
             "workers": workers, "eval_images_per_s": result["images_per_s"], "model_only_images_per_s": model_only,
             "fraction_of_model_only": result["images_per_s"] / model_only}]


# ---- output ---------------------------------------------------------------------------------------


def table(rows: list[dict], columns: list[str]) -> str:
    def cell(v):
        return f"{v:.3g}" if isinstance(v, float) and abs(v) < 10 else f"{v:.0f}" if isinstance(v, float) else str(v)
    body = [[cell(r[c]) for c in columns] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu to check the script")
    p.add_argument("--quick", action="store_true", help="a short run (on CPU: tiny sizes)")
    p.add_argument("--json", type=Path, metavar="PATH", help="write every figure here")
    p.add_argument("--compile", action="store_true",
                   help="on CPU, also the torch.compile candidates (always measured on a GPU)")
    p.add_argument("--budget-s", type=float, default=float("inf"), help="stop starting new work after this long")
    args = p.parse_args(argv)
    device = check_device(args.device)
    gpu = device.startswith("cuda")
    cores = os.cpu_count() or 1
    if gpu:
        torch.backends.cudnn.benchmark = True
        models, precisions = ["hrnet-w18", "hrnet-w48"], ["bf16", "fp16"]
        batches, size = ([1, 256] if args.quick else [256, 1, 64]), 224
        rounds, iters = (3, 5) if args.quick else (5, 10)
        train_cfg = dict(batch=128, size=224, steps=20 if args.quick else 200, warmup=5 if args.quick else 10)
        images = 1000 if args.quick else 5000
        eval_batch = 256
    else:  # the script's own check: tiny sizes, fp32 (fp16 needs a GPU, bf16 is emulated on most CPUs)
        models, precisions, batches, size = ["hrnet-w18-small"], ["fp32"], [1, 4], 64
        rounds, iters = 2, 2
        train_cfg = dict(batch=4, size=32, steps=3, warmup=1)
        images, eval_batch = 24, 8
    compiled = gpu or args.compile  # inductor on 2 shared CPU cores takes minutes per graph
    deadline = Deadline(args.budget_s)
    # priority: w18 at the target precision and batch first, then batch 1, then w48, then the rest
    settings = [(m, p, b) for m in models for p in precisions for b in batches]
    settings.sort(key=lambda s: (s[1] != precisions[0], s[0] != models[0], batches.index(s[2])))
    figures: dict = {"device": device, "card": torch.cuda.get_device_name(device) if gpu else (platform.processor() or platform.machine()),
                     "torch": torch.__version__, "cpu_cores": cores, "quick": args.quick, "compile": compiled,
                     "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])}
    with tempfile.TemporaryDirectory() as tmp:
        first = settings[:1]
        figures["inference"] = inference(first, device, size, rounds, iters, deadline, compiled)
        figures["training"] = training(models[0], device, precisions[0], train_cfg["size"], train_cfg["batch"],
                                       train_cfg["steps"], train_cfg["warmup"], deadline, Path(tmp), compiled)
        figures["eval"] = end_to_end(models[0], device, precisions[0], eval_batch, images, cores, deadline, Path(tmp),
                                     iters)
        figures["inference"] += inference(settings[1:], device, size, rounds, iters, deadline, compiled)
    figures["ratios"] = ratios(figures["inference"])
    figures["skipped"] = deadline.skipped
    print(f"\n{figures['card']} ({device}), torch {figures['torch']}, {cores} CPU cores")
    print("\ninference (median round)")
    print(table(figures["inference"], ["model", "precision", "batch", "candidate", "images_per_s", "latency_ms"]))
    print("\nhrnet's best / timm's best")
    print(table(figures["ratios"], ["model", "precision", "batch", "hrnet_best", "timm_best", "throughput_ratio",
                                    "latency_ratio"]))
    print("\ntraining")
    print(table(figures["training"], ["model", "precision", "batch", "candidate", "images_per_s", "mean_loss_last_20"]))
    print("\neval end to end")
    print(table(figures["eval"], ["model", "precision", "batch", "images", "workers", "eval_images_per_s",
                                  "model_only_images_per_s", "fraction_of_model_only"]))
    if figures["skipped"]:
        print(f"\nnot measured (time budget): {len(figures['skipped'])} items, listed in the JSON")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2))
        print(f"\nfigures: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
