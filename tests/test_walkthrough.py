"""docs/guides/your-own-photos.md, run as a new user would: every command of the page, on 3 class folders
with real names, as subprocesses; then the names must be everywhere the model goes.

The data: 3 × 60 photos per class made from real photographs (scikit-image's cat, rocket and coffee cup
photos) by random crops, flips, rescaling and colour shifts, so the classes are learnable. The page's
commands run unchanged in a fresh directory holding ``photos/`` and ``new-photo.jpg``, except that
the fine-tune gets ``--set data.input_size=32 --set schedule.epochs=2`` (the test's time budget) and
``serve`` a free ``--port``. The "published" ImageNet weights that ``finetune`` starts from come from
``HRNET_MIRROR`` (a folder, as offline users set it up), holding a randomly initialised file.

Checked: the class names in ``predict`` (text and ``--json``, PyTorch and the ONNX file), ONNX metadata,
``serve`` (``/v1/classify``'s label, ``/v1/model``), the served page in headless Chromium (a 3-class
model, its names, no console errors), and timm's ``local-dir:`` load (the page's Python snippet, and
logits within 1e-4 of hrnet's); no command's stderr holds a Python ``Warning:`` line; at most 6 commands.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from test_serve import Server, free_port

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "guides" / "your-own-photos.md"
SRC = ROOT / "src"
MODEL = "hrnet-w18-small"
PER_CLASS = 60
MAX_COMMANDS = 6  # the target: photos to a served model and a timm folder
BUDGET = ["--set", "data.input_size=32", "--set", "schedule.epochs=2"]
PYTHON_WARNING = re.compile(r"\b\w*Warning: ")

skimage_data = pytest.importorskip("skimage.data", reason="scikit-image is not installed")
pytest.importorskip("uvicorn", reason="hrnet[serve] is not installed")
onnx = pytest.importorskip("onnx", reason="hrnet[onnx] is not installed")
timm = pytest.importorskip("timm", reason="timm is not installed (pip install timm)")

SOURCES = {"cat": skimage_data.chelsea, "coffee": skimage_data.coffee, "rocket": skimage_data.rocket}
NAMES = sorted(SOURCES)


def variant(photo: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A random crop (30-100 % of the short edge), maybe mirrored, colour-shifted, at 48-96 px."""
    w, h = photo.size
    side = int(min(w, h) * rng.uniform(0.3, 1.0))
    x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
    img = photo.crop((x, y, x + side, y + side))
    if rng.random() < 0.5:
        img = ImageOps.mirror(img)
    gain = rng.uniform(0.8, 1.2, size=3)
    pixels = np.clip(np.asarray(img, dtype=np.float32) * gain + rng.uniform(-20, 20), 0, 255).astype(np.uint8)
    size = int(rng.integers(48, 97))
    return Image.fromarray(pixels).resize((size, size), Image.BILINEAR)


def write_photos(folder: Path, per_class: int) -> None:
    rng = np.random.default_rng(0)
    for name, load in SOURCES.items():
        photo = Image.fromarray(load()).convert("RGB")
        (folder / name).mkdir(parents=True)
        for i in range(per_class):
            variant(photo, rng).save(folder / name / f"IMG_{i:04d}.jpg", quality=90)


def page_commands(page: Path) -> list[str]:
    """The shell lines of the page's ``bash`` code blocks, in order (comments and blank lines dropped)."""
    blocks = re.findall(r"^```bash\n(.*?)^```", page.read_text(), re.M | re.S)
    return [line.strip() for block in blocks for line in block.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def page_python(page: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", page.read_text(), re.M | re.S)


def assert_no_python_warning(argv: list[str], stderr: str) -> None:
    lines = [line for line in stderr.splitlines() if PYTHON_WARNING.search(line)]
    assert not lines, f"hrnet {shlex.join(argv)}: a Python warning reached the user: {lines}"


def start(argv: list[str], cwd: Path, env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "hrnet", *argv], cwd=cwd, env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT)


def wait_ready(server: Server, argv: list[str]) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            pytest.fail(f"hrnet {shlex.join(argv)} exited with {server.proc.returncode}:\n{server.log.read_text()}")
        try:
            if server.request("GET", "/v2/health/ready", timeout=5)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.3)
    pytest.fail(f"hrnet serve not ready after 300 s:\n{server.log.read_text()}")


def check_page_in_chromium(server: Server, photo: Path, tmp_path: Path) -> str | None:
    """The served page shows a 3-class model with its names and classifies ``photo`` with them; None when
    done, else why it was skipped."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as ec
        from selenium.webdriver.support.ui import WebDriverWait
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    chromium, driver_path = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not (chromium and driver_path):
        return "needs chromium and chromedriver (apt-get install chromium chromium-driver)"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,1500"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(f"http://127.0.0.1:{server.port}/")
        wait = WebDriverWait(driver, 120)
        wait.until(lambda d: "classes" in d.find_element(By.ID, "model-summary").text)
        summary = driver.find_element(By.ID, "model-summary").text
        assert MODEL in summary and "3 classes" in summary, summary
        assert "ImageNet" not in driver.find_element(By.TAG_NAME, "header").text
        driver.find_element(By.ID, "model-summary").click()
        shown_names = driver.find_element(By.ID, "class-names").text
        assert all(name in shown_names for name in NAMES), shown_names
        driver.find_element(By.ID, "files").send_keys(str(photo))
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "ol.top li")))
        labels = [li.find_element(By.CLASS_NAME, "class-label").text
                  for li in driver.find_elements(By.CSS_SELECTOR, "ol.top li")]
        assert sorted(labels) == NAMES, labels  # all 3 classes, by name: top_k never above the class count
        driver.save_screenshot(str(tmp_path / "page.png"))
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, json.dumps(errors)
    finally:
        driver.quit()
    return None


@pytest.mark.slow
def test_the_your_own_photos_page_runs_and_the_names_go_everywhere(tmp_path, record_property):
    work = tmp_path / "work"
    write_photos(work / "photos", PER_CLASS)
    variant(Image.fromarray(skimage_data.chelsea()), np.random.default_rng(99)).save(work / "new-photo.jpg")
    mirror = tmp_path / "mirror"  # hrnet-w18-small's "published" file, as HRNET_MIRROR serves it offline
    mirror.mkdir()
    from safetensors.torch import save_file

    import hrnet

    torch.manual_seed(0)
    save_file(hrnet.create_model(MODEL).state_dict(), str(mirror / "hrnet_w18_small.ms_in1k.safetensors"))
    env = {**os.environ, "PYTHONPATH": str(SRC), "HRNET_MIRROR": str(mirror), "HRNET_HOME": str(tmp_path / "home")}
    for key in ("HRNET_OFFLINE", "PYTHONWARNINGS"):  # Python's warning filters as a user has them
        env.pop(key, None)

    commands = page_commands(PAGE)
    assert commands and all(c.startswith("hrnet ") for c in commands), commands
    assert [shlex.split(c)[1] for c in commands] == ["train", "predict", "export", "convert", "serve"]
    record_property("commands", len(commands))
    assert len(commands) <= MAX_COMMANDS

    def run(argv: list[str], timeout: float = 600) -> str:
        proc = subprocess.run([sys.executable, "-m", "hrnet", *argv], cwd=work, env=env, capture_output=True,
                              text=True, timeout=timeout)
        assert proc.returncode == 0, f"hrnet {shlex.join(argv)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
        assert_no_python_warning(argv, proc.stderr)
        return proc.stdout

    started = time.monotonic()
    outputs: dict[str, str] = {}
    server = None
    try:
        for line in commands:
            argv = shlex.split(line)[1:]
            if argv[0] == "train":
                argv += BUDGET
            if argv[0] == "serve":
                port = free_port()
                argv += ["--port", str(port)]
                server = Server(start(argv, work, env, tmp_path / "serve.log"), port, tmp_path, tmp_path / "serve.log")
                wait_ready(server, argv)
            else:
                outputs[argv[0]] = run(argv)
        elapsed = time.monotonic() - started
        record_property("wall_s", round(elapsed, 1))
        print(f"\nyour-own-photos walkthrough: {len(commands)} commands, {elapsed:.0f} s (serve until ready)")

        weights = work / "runs" / "photos" / "best.safetensors"
        assert weights.is_file()
        model = hrnet.create_model(MODEL, checkpoint=weights).eval()
        assert model.num_classes == 3 and list(model.class_names) == NAMES

        # predict: text and --json, from the weights and from the ONNX file
        text = outputs["predict"]
        ranked = re.findall(r"^\s+\d\.\s+[\d.]+%\s+(\S+) \((\d)\)$", text, re.M)
        assert sorted(name for name, _ in ranked) == NAMES, text  # 3 classes, by name (top-5 clamped to 3)
        assert all(NAMES[int(i)] == name for name, i in ranked)
        predict = shlex.split(commands[1])[1:]
        records = json.loads(run([*predict, "--json"]))
        top = records[0]["topk"]
        assert [t["label"] for t in top] == [name for name, _ in ranked]
        onnx_file = work / "photos.onnx"
        meta = {p.key: p.value for p in onnx.load(str(onnx_file), load_external_data=False).metadata_props}
        assert json.loads(meta["hrnet.class_names"]) == NAMES, meta
        onnx_top = json.loads(run([*predict[:predict.index("--checkpoint") + 1], str(onnx_file), "new-photo.jpg",
                                   "--json"]))[0]["topk"]
        assert [t["label"] for t in onnx_top] == [t["label"] for t in top]

        # serve: the label, the model's description, the page
        status, _, body = server.request("POST", "/v1/classify", (work / "new-photo.jpg").read_bytes())
        assert status == 200, body
        answer = json.loads(body)
        assert answer[0]["label"] == top[0]["label"] and answer[0]["index"] == top[0]["index"]
        status, info = server.json("GET", "/v1/model")
        assert status == 200 and info["num_classes"] == 3 and info["labels"] == NAMES, info
        skipped = check_page_in_chromium(server, work / "new-photo.jpg", tmp_path)
        if skipped:
            print(f"the page in Chromium: skipped, {skipped}")
            record_property("browser", f"skipped: {skipped}")
        assert server.stop() == 0
        assert_no_python_warning(["serve"], server.log.read_text())

        # timm: the page's snippet, then the logits
        for snippet in page_python(PAGE):
            proc = subprocess.run([sys.executable, "-c", snippet], cwd=work, env=env, capture_output=True, text=True,
                                  timeout=300)
            assert proc.returncode == 0, proc.stderr[-3000:]
            assert str(NAMES) in proc.stdout, proc.stdout
        folder = work / "photos-timm"
        timm_model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
        assert timm_model.num_classes == 3 and timm_model.pretrained_cfg["label_names"] == NAMES
        x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.testing.assert_close(timm_model(x), model(x), atol=1e-4, rtol=0)
    finally:
        if server is not None and server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait(30)
