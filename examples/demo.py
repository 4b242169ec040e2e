"""The first hour of hrnet in one run (``make demo``): every step is an ``hrnet`` command, printed before
it runs so you can copy it.

1. If hrnet-w18's published weights can be had (cached, ``HRNET_MIRROR``, or the network answering
   within a few seconds), classify the example photos with them; otherwise say so and go on.
2. The embedded default, which needs no network: scikit-learn's 1,797 digit scans written as image
   folders (``hrnet data digits``), the digits recipe trained on them (``hrnet train``), then
   ``hrnet plot`` of the training curves, ``hrnet eval`` on the held-out folder, ``hrnet predict`` on a
   few held-out scans, ``hrnet cam``, ``hrnet export`` to ONNX and ``hrnet bench`` eager vs
   onnxruntime, and a summary listing the pictures (training curves, Grad-CAM) and files written.

A second run reuses the data and the trained weights. Files go under the current directory
(``digits/``, ``runs/``), or ``HRNET_DEMO_DIR``. Budget knobs (environment variables):
``HRNET_DEMO_EPOCHS`` (default: the recipe's), ``HRNET_DEMO_PER_CLASS`` (scans per digit, default all),
``HRNET_DEMO_IMAGES`` (scans to predict, default 5),
``HRNET_DEMO_BENCH_ITERS`` (default 20), ``HRNET_DEMO_PROBE_S`` (seconds to wait for the network,
default 3).
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
MODEL = "hrnet-w18-small"  # the digits recipe's model


class CommandFailed(Exception):
    pass


def say(text: str = "") -> None:
    print(text, flush=True)


def shown(path: Path, workdir: Path) -> str:
    """``path`` relative to the working directory when it is inside it (shorter to copy), else absolute."""
    try:
        return str(path.resolve().relative_to(workdir.resolve()))
    except ValueError:
        return str(path.resolve())


def hrnet(*args: str, workdir: Path, note=None, check: bool = True) -> tuple[int, str]:
    """Print ``hrnet ARGS`` and run it; its stdout is echoed line by line (``note(line)`` may add to a
    line) and returned; stderr (progress bars on a terminal, errors) passes through."""
    say(f"\n$ hrnet {shlex.join(args)}")
    proc = subprocess.Popen([sys.executable, "-m", "hrnet", *args], cwd=workdir, stdout=subprocess.PIPE,
                            text=True, bufsize=1)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        extra = note(line) if note else ""
        say(line.rstrip("\n") + (extra or ""))
    code = proc.wait()
    if code and check:
        raise CommandFailed(f"'hrnet {shlex.join(args)}' failed with exit status {code}")
    return code, "".join(lines)


def weights_unreachable(name: str, timeout: float) -> str | None:
    """Why ``name``'s published weights cannot be had right now, or None if they can (cached, in a
    mirror folder, or the mirror/publisher's host accepts a connection within ``timeout`` seconds)."""
    import hrnet
    from hrnet.weights import download  # the library's own cache and mirror rules, not a copy of them

    info = hrnet.get_model_info(name)
    if download.cached(info["url"], info["filename"]):
        return None
    if download.offline():
        return "HRNET_OFFLINE is set and they are not in the cache"
    source = download.source_of(info["url"], info["filename"])
    if not download.is_url(source):
        return None if Path(source).is_file() else f"they are not in the mirror folder {os.environ['HRNET_MIRROR']}"
    url = urlsplit(source)
    port = url.port or (443 if url.scheme == "https" else 80)
    outcome: list[str | None] = []

    def connect() -> None:  # in a thread: name resolution has no timeout of its own
        try:
            socket.create_connection((url.hostname, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as e:
            outcome.append(f"{url.hostname}:{port} does not answer ({e.strerror or e})")

    worker = threading.Thread(target=connect, daemon=True)
    worker.start()
    worker.join(timeout)
    return outcome[0] if outcome else f"{url.hostname}:{port} did not answer within {timeout:g} s"


def photos(workdir: Path, timeout: float) -> None:
    say("== 1. hrnet-w18's published ImageNet weights on the example photos")
    why = weights_unreachable("hrnet-w18", timeout)
    if why:
        say(f"skipped: hrnet-w18's weights cannot be downloaded ({why}); once online run "
            f"'hrnet predict hrnet-w18 examples/images', or set HRNET_MIRROR to a folder or URL that has them.")
        return
    code, _ = hrnet("predict", "hrnet-w18", shown(ROOT / "examples" / "images", workdir), "--topk", "3",
                    workdir=workdir, check=False)
    if code:
        say("skipped: the download did not complete (see above); the digits demo goes on.")


def true_label(line: str) -> str:
    """For a predict output line naming a held-out scan ``.../val/<digit>/N.png``: its true label."""
    m = re.search(r"val/(\d)/\d+\.png$", line.strip())
    return f"    (true label: {m.group(1)})" if m else ""


def digits(workdir: Path, epochs: str | None, per_class: str | None, n_images: int, iters: str) -> None:
    say("\n== 2. hrnet-w18-small trained from scratch on scikit-learn's handwritten digits (no network needed)")
    data, run, out = workdir / "digits", workdir / "runs" / "digits", workdir / "runs" / "demo"
    if (data / "train").is_dir() and (data / "val").is_dir():
        say(f"\nreusing the data set in {shown(data, workdir)}/")
    else:
        hrnet("data", "digits", shown(data, workdir), *(["--per-class", per_class] if per_class else []),
              workdir=workdir)

    weights = run / "best.safetensors"
    if weights.is_file():
        say(f"\nreusing the trained weights {shown(weights, workdir)} (delete {shown(run, workdir)}/ to train again)")
    else:
        args = ["train", "digits"]  # the recipe inside the package: data digits/, output runs/digits/
        args += ["--set", f"schedule.epochs={epochs}"] if epochs else []
        args += ["--resume"] if any((run / "checkpoints").glob("step-*.pt")) else []
        hrnet(*args, workdir=workdir)
        if not weights.is_file():
            raise CommandFailed(f"training wrote no {shown(weights, workdir)}")
    model = [MODEL, "--checkpoint", shown(weights, workdir)]
    out.mkdir(parents=True, exist_ok=True)
    curves, cam, onnx = out / "training-curves.png", out / "cam.png", out / "digits.onnx"
    hrnet("plot", shown(run, workdir), "-o", shown(curves, workdir), workdir=workdir)

    # no --input-size: best.safetensors carries the evaluation settings it was trained for (32x32)
    _, text = hrnet("eval", *model, "--data", shown(data / "val", workdir), workdir=workdir)
    accuracy = re.search(r"top-1\D*([\d.]+)", text)

    val = sorted(p for p in (data / "val").iterdir() if p.is_dir())
    picks = [sorted(folder.glob("*.png"))[0] for folder in val][:n_images]
    hrnet("predict", *model, *[shown(p, workdir) for p in picks], "--topk", "1", workdir=workdir, note=true_label)

    hrnet("cam", *model, shown(picks[-1], workdir), "-o", shown(cam, workdir), workdir=workdir)
    hrnet("export", *model, "-o", shown(onnx, workdir), workdir=workdir)
    _, text = hrnet("bench", *model, "--backend", "eager", "onnxruntime", "--batch-size", "16", "--iters", iters,
                    workdir=workdir)  # at the 32x32 the weights carry, as above
    speeds = {m.group(1): m.group(2) for m in re.finditer(r"^(eager|onnxruntime)\s+([\d.]+)", text, re.M)}

    say("\n== summary")
    say(f"held-out accuracy (hrnet eval): {accuracy.group(1) if accuracy else '?'} % top-1")
    say("images/s at batch 16, 32x32 (hrnet bench): "
        + ", ".join(f"{b} {speeds.get(b, '?')}" for b in ("eager", "onnxruntime")))
    say("files:")
    for path, what in [(data, "the digits as image folders (train/, val/)"),
                       (weights, "the trained weights (hrnet's safetensors format)"),
                       (run / "log.jsonl", "the training log"),
                       (curves, "picture: loss, accuracy and learning rate per step (hrnet plot)"),
                       (cam, "picture: where the model looks, on a held-out scan (hrnet cam)"),
                       (onnx, "ONNX export, preprocessing in its metadata")]:
        say(f"  {shown(path, workdir) + ('/' if path.is_dir() else ''):<32} {what}")


def main() -> int:
    workdir = Path(os.environ.get("HRNET_DEMO_DIR") or ".").resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if sys.prefix != sys.base_prefix:  # in a venv, as under make demo
        say(f"(each 'hrnet' below is {Path(sys.prefix) / 'bin' / 'hrnet'}; "
            f"'source {shown(Path(sys.prefix), workdir)}/bin/activate' to type them as shown)\n")
    try:
        photos(workdir, float(os.environ.get("HRNET_DEMO_PROBE_S", "3")))
        digits(workdir, os.environ.get("HRNET_DEMO_EPOCHS"), os.environ.get("HRNET_DEMO_PER_CLASS"),
               int(os.environ.get("HRNET_DEMO_IMAGES", "5")),
               os.environ.get("HRNET_DEMO_BENCH_ITERS", "20"))
    except CommandFailed as e:
        print(f"demo: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
