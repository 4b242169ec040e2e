"""The trainer end to end on real images (scikit-learn's digits), on small CPU runs.

- kill -9 in the middle of an epoch, then --resume: the same weights as a run never interrupted;
- torchrun with two processes and SyncBatchNorm: the weights of one process with the same global batch;
- a NaN loss stops the run naming the step and the last good checkpoint, or is skipped on request;
- a short digits run learns (loss falls, accuracy far above chance), exports weights that
  ``create_model`` loads to the logged accuracy, and ``hrnet plot`` draws its curves.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

import hrnet
from hrnet import create_model
from hrnet.cli import main as hrnet_main
from hrnet.data import ImageDataset, Sample, collate, eval_transform
from hrnet.training.state import ResumeError, checkpoints, load_state
from hrnet.training.config import load_config
from hrnet.training.sampler import EpochSeeded, ShardedBatchSampler
from hrnet.training.train import NonFiniteLossError, Trainer, train

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.usefixtures("one_thread")


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("train_digits", ROOT / "benchmarks" / "train_digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


write_digits = _load_benchmark().write_digits


def run_config(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


def hrnet_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "hrnet", *args]


def log_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


# ---- sampler ---------------------------------------------------------------------------------

def test_ranks_take_disjoint_slices_of_the_single_process_global_batch():
    single = list(ShardedBatchSampler(50, 8, seed=3))
    ranks = [list(ShardedBatchSampler(50, 4, rank=r, world_size=2, seed=3)) for r in range(2)]
    assert len(single) == len(ranks[0]) == len(ranks[1]) == 50 // 8
    for step, batch in enumerate(single):
        assert ranks[0][step] + ranks[1][step] == batch
        assert not set(ranks[0][step]) & set(ranks[1][step])
    flat = [i for b in single for i in b]
    assert len(set(flat)) == len(flat) and set(flat) <= set(range(50))


def test_each_epoch_reshuffles_and_a_resumed_epoch_skips_what_was_done():
    sampler = ShardedBatchSampler(40, 5, seed=0)
    sampler.set_epoch(0)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert first != second and sorted(sum(first, [])) == sorted(sum(second, [])) == list(range(40))
    sampler.set_epoch(1, start=3 * 5)  # a global sample index
    assert list(sampler) == second[3:] and len(sampler) == 5


def test_augmentation_of_a_sample_depends_only_on_seed_epoch_and_index():
    class Noise(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.rand(3)

    data = EpochSeeded(Noise(), seed=7)
    torch.manual_seed(0)
    a = [data[i] for i in range(4)]
    torch.manual_seed(123)
    before = torch.get_rng_state()
    b = [data[i] for i in reversed(range(4))][::-1]
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # same values whatever the order and global seed
    assert torch.equal(torch.get_rng_state(), before)  # and the caller's generator is left untouched
    assert not torch.equal(a[0], a[1])
    data.epoch = 1
    assert not torch.equal(data[0], a[0])


# ---- kill -9 and resume ----------------------------------------------------------------------

RESUME_CFG = """
model: {{name: hrnet-w18-small, drop_rate: 0.2}}
data: {{train: {data}/train, val: {data}/val, input_size: 32, crop_scale: [0.5, 1.0], batch_size: 6, workers: 0}}
optim: {{lr: 0.4}}
schedule: {{epochs: 2, warmup_epochs: 0.5}}
train: {{deterministic: true, ema_decay: 0.9, clip_grad_norm: 5.0, label_smoothing: 0.1, seed: 1}}
output: {{log_every: 1, checkpoint_every: 3, keep_last: 10}}
"""


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_ends_with_identical_weights(tmp_path):
    write_digits(tmp_path / "d", size=32, per_class=8)  # 60 training images: 10 steps of 6 per epoch
    cfg = run_config(tmp_path, "resume", RESUME_CFG.format(data=tmp_path / "d"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    subprocess.run(hrnet_cmd("train", str(cfg), "-q", "--set", f"output.dir={straight}"), check=True, env=env)

    proc = subprocess.Popen(hrnet_cmd("train", str(cfg), "-q", "--set", f"output.dir={broken}"), env=env)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (broken / "log.jsonl").exists() and any(r["step"] >= 4 for r in log_records(broken)):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    newest = load_state(checkpoints(broken / "checkpoints")[-1])
    assert 0 < newest["batch_in_epoch"] < 10, "the kill should land in the middle of an epoch"
    subprocess.run(hrnet_cmd("train", str(cfg), "-q", "--set", f"output.dir={broken}", "--resume"),
                   check=True, env=env)

    a = load_state(straight / "checkpoints" / "step-00000020.pt")
    b = load_state(broken / "checkpoints" / "step-00000020.pt")
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    # the resumed log repeats nothing and agrees line by line with the straight run
    la, lb = ([r for r in log_records(d) if r["kind"] != "resume"] for d in (straight, broken))
    assert [(r["kind"], r["step"], r["loss"]) for r in la] == [(r["kind"], r["step"], r["loss"]) for r in lb]
    assert [r["step"] for r in log_records(broken) if r["kind"] == "resume"] == [newest["step"]]


# ---- torchrun ---------------------------------------------------------------------------------

# Both sides run in float64: in float32 the trajectory of a randomly initialised HRNet on these tiny
# inputs is chaotic (one process run with 1 and with 2 threads differs by 17 % after three steps), which
# would hide what this test is about: the same algorithm, sharded.
DDP_DRIVER = """
import sys, torch
from hrnet.training.config import load_config
from hrnet.distributed import cleanup
from hrnet.training.train import Trainer, build_datasets

class Float64:
    def __init__(self, data):
        self.data, self.classes = data, data.classes
    def __len__(self):
        return len(self.data)
    def __getitem__(self, i):
        sample = self.data[i]
        return sample._replace(image=sample.image.double())

torch.set_default_dtype(torch.float64)
cfg = load_config(sys.argv[1], sys.argv[2:])
trainer = Trainer(cfg, train_set=Float64(build_datasets(cfg)[0]), quiet=True)
initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
trainer.fit()
torch.save(initial, f"{cfg.output.dir}/initial{trainer.dist.rank}.pt")
torch.save(trainer.model.state_dict(), f"{cfg.output.dir}/rank{trainer.dist.rank}.pt")
cleanup()
"""

DDP_CFG = """
model: {{name: hrnet-w18-small}}
data: {{train: {data}/train, input_size: 32, crop_scale: [0.5, 1.0], workers: 0}}
optim: {{lr: 0.8, weight_decay: 1.0e-4}}
schedule: {{epochs: 1}}
train: {{sync_bn: true, seed: 5}}
output: {{log_every: 1}}
"""


@pytest.mark.slow
def test_two_processes_with_syncbn_match_one_process_with_the_same_global_batch(tmp_path):
    write_digits(tmp_path / "d", size=32, per_class=4, held_out=0.0)  # 40 images: 5 global batches of 8
    cfg = run_config(tmp_path, "ddp", DDP_CFG.format(data=tmp_path / "d"))
    driver = tmp_path / "driver.py"
    driver.write_text(DDP_DRIVER)
    two, one = tmp_path / "two", tmp_path / "one"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    str(driver), str(cfg), "data.batch_size=4", f"output.dir={two}"], check=True, env=env,
                   timeout=300)
    subprocess.run([sys.executable, str(driver), str(cfg), "data.batch_size=8", f"output.dir={one}"], check=True,
                   env=env, timeout=300)

    steps_two = [r for r in log_records(two) if r["kind"] == "step"]
    steps_one = [r for r in log_records(one) if r["kind"] == "step"]
    assert [r["step"] for r in steps_two] == [1, 2, 3, 4, 5]
    for a, b in zip(steps_two, steps_one):  # the logged metrics are reduced over both ranks
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-9) and a["accuracy"] == b["accuracy"]
    rank0, rank1 = (torch.load(two / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # the two processes stayed in sync
    saved = load_state(two / "checkpoints" / "step-00000005.pt")["model"]
    assert all(torch.equal(rank0[k], saved[k]) for k in rank0)
    single = torch.load(one / "rank0.pt", weights_only=True)
    initial = torch.load(one / "initial0.pt", weights_only=True)
    for k, want in single.items():
        if want.dtype.is_floating_point:
            torch.testing.assert_close(rank0[k], want, rtol=1e-7, atol=1e-9, msg=k)
        else:
            assert torch.equal(rank0[k], want), k
    moved = [k for k in single if "weight" in k and (single[k] - initial[k]).abs().max() > 1e-4]
    assert len(moved) > 0.9 * sum("weight" in k for k in single)  # the comparison is not of untouched weights


# ---- non-finite loss --------------------------------------------------------------------------

class PoisonedAfter(Dataset):
    """Random 32x32 images whose pixels turn NaN for the fetches numbered in ``poisoned``."""

    classes = ["a", "b", "c", "d"]

    def __init__(self, poisoned: range):
        self.poisoned, self.fetched = poisoned, 0
        self.images = torch.randn(48, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Sample:
        image = self.images[i].clone()
        if self.fetched in self.poisoned:
            image[0, 0, 0] = float("nan")
        self.fetched += 1
        return Sample(image, i % 4, i)


def tiny_config(tmp_path: Path, *extra: str):
    """hrnet-w18-small on 32x32 inputs, batches of 4, one epoch, a checkpoint every 2 steps."""
    return load_config(None, ["model.name=hrnet-w18-small", "data.input_size=32", "data.batch_size=4",
                              "data.workers=0", "schedule.epochs=1", "output.log_every=1",
                              "output.checkpoint_every=2", f"output.dir={tmp_path / 'run'}", *extra])


def test_nan_loss_stops_naming_the_step_and_the_last_good_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at step 3 \(epoch 1\); the weights "
                                                 r"were not updated; the last good checkpoint is .*step-00000002\.pt"):
        train(cfg, quiet=True, train_set=PoisonedAfter(range(8, 12)))  # the third batch of 4
    run = tmp_path / "run"
    assert [p.name for p in checkpoints(run / "checkpoints")] == ["step-00000002.pt"]
    state = load_state(run / "checkpoints" / "step-00000002.pt")
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.dtype.is_floating_point)
    assert max(r["step"] for r in log_records(run)) == 2


@pytest.mark.slow
def test_nan_loss_is_skipped_when_the_config_says_so(tmp_path):
    cfg = tiny_config(tmp_path, "train.on_nonfinite=skip")
    trainer = Trainer(cfg, quiet=True, train_set=PoisonedAfter(range(8, 12)))
    trainer.fit()
    records = log_records(tmp_path / "run")
    assert [r["step"] for r in records if r["kind"] == "skipped"] == [3]
    assert trainer.step == 12
    state = trainer.model.state_dict()  # parameters and BatchNorm statistics alike
    assert all(torch.isfinite(v).all() for v in state.values() if v.dtype.is_floating_point)
    assert state["bn1.num_batches_tracked"].item() == 11  # the skipped batch left no trace


# ---- real digits, end to end --------------------------------------------------------------------

DIGITS_CFG = """
model: {{name: hrnet-w18-small}}
data: {{train: {data}/train, val: {data}/val, input_size: 32, crop_scale: [0.6, 1.0], hflip: false,
       batch_size: 16, workers: 0}}
optim: {{lr: 0.16}}
schedule: {{epochs: 4, warmup_epochs: 0.5}}
output: {{dir: {run}, log_every: 5}}
"""


@pytest.mark.slow
def test_short_digits_run_learns_exports_loadable_weights_and_plots(tmp_path, capsys):
    write_digits(tmp_path / "d", size=32, per_class=40)  # 320 training and 80 held-out real digits
    (tmp_path / "d" / "train" / "3" / "broken.png").write_bytes(b"")  # dropped from its batch, not fatal
    run = tmp_path / "run"
    cfg = run_config(tmp_path, "digits", DIGITS_CFG.format(data=tmp_path / "d", run=run))
    assert hrnet_main(["train", str(cfg), "--json", "-q"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 4 * 20 and Path(summary["best_weights"]) == run / "best.safetensors"

    records = log_records(run)
    steps = [r for r in records if r["kind"] == "step"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert {"loss", "accuracy", "lr", "images_per_s", "memory_mb"} <= steps[0].keys()
    assert epochs[-1]["loss"] < 0.6 * steps[0]["loss"]  # the loss falls
    best = max(r["val_top1"] for r in epochs)
    assert best >= 50.0  # chance is 10 %

    # the exported weights, loaded through the public path, score what the log says: they carry their
    # evaluation settings (32x32), so nobody has to repeat them
    model = create_model("hrnet-w18-small", checkpoint=run / "best.safetensors").eval()
    assert model.num_classes == 10 and model.eval_cfg.input_size == 32
    data = ImageDataset(tmp_path / "d" / "val", transform=eval_transform(model))
    batch = collate([data[i] for i in range(len(data))])
    with torch.no_grad():
        correct = (model(batch.images).argmax(1) == batch.labels).sum().item()
    assert 100.0 * correct / len(data) == pytest.approx(best)
    assert hrnet.evaluate("hrnet-w18-small", tmp_path / "d" / "val",
                          checkpoint=run / "best.safetensors")["top1"] == pytest.approx(best)

    png = tmp_path / "curves.png"
    capsys.readouterr()
    assert hrnet_main(["plot", str(run), "-o", str(png), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"output": str(png)}
    img = np.asarray(Image.open(png).convert("RGB"))
    assert img.shape == (3 * 230 + 20, 720, 3)
    blue = (img == (31, 119, 180)).all(axis=2)
    orange = (img == (230, 110, 20)).all(axis=2)
    for panel in range(3):  # a training curve in every panel, validation points in the first two
        assert blue[panel * 230:(panel + 1) * 230].sum() > 100
    assert orange[:460].sum() > 20


@pytest.mark.parametrize("switches", [
    ["train.amp=bf16", "train.channels_last=true"],
    ["train.amp=fp16", "train.clip_grad_norm=1.0"],
    ["train.ema_decay=0.5", "train.label_smoothing=0.1", "optim.name=adamw", "optim.lr=0.01"],
])
@pytest.mark.slow
def test_precision_and_regularisation_switches_train_to_finite_weights(tmp_path, switches):
    cfg = tiny_config(tmp_path, "data.batch_size=8", *switches)
    trainer = Trainer(cfg, quiet=True, train_set=PoisonedAfter(range(0)))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.fit()
    after = trainer.model.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values() if v.dtype.is_floating_point)
    assert not torch.equal(before["classifier.weight"], after["classifier.weight"])
    if trainer.ema:  # the EMA lags the model: a convex mix of where it started and where it went
        ema = trainer.ema.module.state_dict()["classifier.weight"]
        assert not torch.equal(ema, after["classifier.weight"]) and not torch.equal(ema, before["classifier.weight"])


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path(os.environ["HRNET_TEST_MARKER"]),))


def test_resume_refuses_missing_truncated_and_code_carrying_checkpoints(tmp_path, monkeypatch):
    trainer = Trainer(tiny_config(tmp_path), quiet=True, train_set=PoisonedAfter(range(0)))
    with pytest.raises(ResumeError, match=r"checkpoints: no checkpoint to resume from"):
        trainer.resume()
    good = tmp_path / "good.pt"
    torch.save(trainer.state(), good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:5000])
    truncated_message = r"truncated\.pt: (not a readable training checkpoint|corrupt or truncated torch file)"
    with pytest.raises(ResumeError, match=truncated_message):
        trainer.resume(truncated)
    marker = tmp_path / "pwned"
    monkeypatch.setenv("HRNET_TEST_MARKER", str(marker))
    evil = tmp_path / "evil.pt"
    torch.save({"model": _Payload()}, evil)
    with pytest.raises(ResumeError, match=r"evil\.pt: not a readable training checkpoint"):
        trainer.resume(evil)
    assert not marker.exists()  # the payload never ran
    trainer.resume(good)  # while a real one loads
    assert trainer.step == 0
