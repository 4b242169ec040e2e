"""Hostile and careless input to ``hrnet train`` / ``hrnet plot``: one line of error, never a crash,
a hang, a lost run or a checkpoint with NaN in it.

Anything that blew up memory or blocked forever before the fix runs in a subprocess under a memory
limit and a timeout, so a regression fails the test instead of taking the machine down.
"""

from __future__ import annotations

import fcntl
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hrnet import create_model
from hrnet.cli import main as hrnet_main
from hrnet.training.config import ConfigError, load_config
from hrnet.training.train import NonFiniteWeightsError, Trainer
from hrnet.weights import save_checkpoint

from test_train import hrnet_cmd, log_records, write_digits

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HRNET_OFFLINE": "1"}

# 40 images at 32 px, batches of 8: 5 steps per epoch, a few seconds per run
TINY = """
model: {{name: hrnet-w18-small}}
data: {{train: {data}/train, input_size: 32, crop_scale: [0.5, 1.0], batch_size: 8, workers: 0}}
optim: {{lr: 0.1}}
schedule: {{epochs: {epochs}}}
output: {{dir: {run}, log_every: 1}}
"""

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("digits")
    write_digits(root, size=32, per_class=4, held_out=0.0)
    return root


def tiny_cfg(tmp_path: Path, digits: Path, epochs: int = 1, name: str = "tiny") -> tuple[Path, Path]:
    run = tmp_path / f"run-{name}"
    path = tmp_path / f"{name}.yaml"
    path.write_text(TINY.format(data=digits, run=run, epochs=epochs))
    return path, run


def cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = hrnet_main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, err: str, *fragments: str) -> None:
    assert rc == 1, err
    lines = [line for line in err.splitlines() if line.startswith("hrnet: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def run_limited(*commands: list[str], timeout: float = 120, memory_mb: int = 1024) -> list[tuple[int, str]]:
    """(exit code, stderr) of each ``hrnet COMMAND``, run one after the other in one subprocess whose
    address space may grow by ``memory_mb`` after importing hrnet (a bomb fails instead of swapping)."""
    driver = (
        "import contextlib, io, json, resource, sys\n"
        "import hrnet.cli, hrnet.cli.train, hrnet.training.train\n"
        "vm = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize()\n"
        f"resource.setrlimit(resource.RLIMIT_AS, (vm + {memory_mb} * 2**20, resource.RLIM_INFINITY))\n"
        "results = []\n"
        "for argv in json.loads(sys.argv[1]):\n"
        "    err = io.StringIO()\n"
        "    with contextlib.redirect_stderr(err):\n"
        "        rc = hrnet.cli.main(argv)\n"
        "    results.append((rc, err.getvalue()))\n"
        "print(json.dumps(results))\n")
    proc = subprocess.run([sys.executable, "-c", driver, json.dumps(commands)], capture_output=True, text=True,
                          timeout=timeout, env=ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [tuple(r) for r in json.loads(proc.stdout)]


# ---- the config file -------------------------------------------------------------------------------

@pytest.mark.slow
def test_hostile_config_files_fail_fast_in_one_line_within_bounded_memory(tmp_path):
    deep = tmp_path / "deep.yaml"
    deep.write_text("model:\n  name: " + "[" * 5000 + "]" * 5000 + "\n")
    bomb = tmp_path / "bomb.yaml"  # 9^9 strings once expanded, under a known key
    levels = ["&l0 [" + ", ".join(["xxxxxxxxxx"] * 9) + "]"]
    levels += [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 9)]
    bomb.write_text("train:\n" + "".join(f"  {key}: {level}\n" for key, level in
                                         zip(["device", "seed", "amp", "sync_bn", "ema_decay", "on_nonfinite",
                                              "label_smoothing", "clip_grad_norm", "deterministic"], levels)))
    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * 200_000)
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    cases = [(deep, "nested deeper than"), (bomb, "YAML nodes (counting what aliases expand to)"),
             (big, "larger than"), (fifo, "not a regular file")]
    results = run_limited(*[["train", str(path)] for path, _ in cases], timeout=120)
    for (path, message), (rc, err) in zip(cases, results):
        assert_one_line_error(rc, err, str(path), message)
        assert len(err) < 400


def test_set_values_follow_yaml_1_2_numbers_and_strings(tmp_path):
    cfg = load_config(None, ["optim.lr=1e-3", "optim.weight_decay=5E-5", "schedule.epochs=010",
                             "output.dir=no", "data.train=2024-01-01", "data.val=1:30"])
    assert cfg.optim.lr == 0.001 and cfg.optim.weight_decay == 5e-5
    assert cfg.schedule.epochs == 10  # YAML 1.1 would read 010 as octal 8
    assert (cfg.output.dir, cfg.data.train, cfg.data.val) == ("no", "2024-01-01", "1:30")
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1e-3\n")
    assert load_config(path).optim.lr == 0.001
    path.write_text("data:\n  hflip: off\n")
    with pytest.raises(ConfigError, match=r"data\.hflip must be true/false, got 'off'"):
        load_config(path)


@pytest.mark.parametrize("item, message", [
    ("optim.lr=.inf", "optim.lr must be finite, got inf"),
    ("optim.lr=1e999", "optim.lr must be finite, got inf"),
    ("train.label_smoothing=.nan", "train.label_smoothing must be finite, got nan"),
    ("optim.lr=-0.1", "optim.lr must be positive"),
    ("optim.lr=1e300", "optim.lr must be at most 1000"),
    ("optim.weight_decay=2", "optim.weight_decay must be in [0, 1]"),
    ("optim.momentum=1.5", "optim.momentum must be in [0, 1)"),
    ("optim.weight_decay=-1e-4", "optim.weight_decay must be in [0, 1]"),
    ("data.workers=-1", "data.workers must be auto, 0"),
    ("data.input_size=0", "data.input_size must be a multiple of 32"),
    ("model.num_classes=0", "model.num_classes must be at least 1"),
    ("model.drop_rate=1", "model.drop_rate must be in [0, 1)"),
    ("schedule.warmup_epochs=-1", "schedule.warmup_epochs must be 0 or more"),
    ("train.seed=-1", "train.seed must be in [0, 2^31)"),
    ("train.clip_grad_norm=0", "train.clip_grad_norm must be positive"),
    ("output.checkpoint_every=-5", "output.checkpoint_every must be 0"),
    ("schedule.epochs=" + "9" * 5000, "schedule.epochs must be an integer"),
])
def test_every_numeric_value_is_checked_for_finiteness_and_range(item, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [item])
    assert message in str(e.value) and len(str(e.value)) < 300


def test_errors_never_print_a_huge_value():
    with pytest.raises(ConfigError, match="model.name must be a string") as e:
        load_config(None, ["model.name=[" + ", ".join(["abcdefgh"] * 5000) + "]"])
    assert len(str(e.value)) < 300


# ---- the run directory -------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_second_training_in_a_locked_run_dir_fails_at_once(tmp_path, digits):
    cfg, run = tiny_cfg(tmp_path, digits, epochs=50)
    first = subprocess.Popen(hrnet_cmd("train", str(cfg), "-q"), env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while not (run / "log.jsonl").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert first.poll() is None, first.stderr.read()
        start = time.monotonic()
        second = subprocess.run(hrnet_cmd("train", str(cfg), "-q", "--force"), env=ENV, capture_output=True,
                                text=True, timeout=120)
        assert_one_line_error(second.returncode, second.stderr, f"output.dir={run}",
                              f"another training (pid {first.pid}) is running")
        assert time.monotonic() - start < 60 and first.poll() is None  # refused before any work, first untouched
        assert (run / "log.jsonl").exists() and (run / "config.yaml").exists()
    finally:
        first.kill()
        first.wait()
    with open(run / ".lock") as f:  # a killed run leaves no lock behind: the kernel dropped it
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


@pytest.mark.slow
def test_a_finished_run_is_never_overwritten_and_force_starts_afresh(tmp_path, digits, capsys):
    cfg, run = tiny_cfg(tmp_path, digits)
    assert cli(capsys, "train", str(cfg), "-q")[0] == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    rc, _, err = cli(capsys, "train", str(cfg), "-q")
    assert_one_line_error(rc, err, f"output.dir={run}: holds a previous run", "--resume", "--force",
                          "another output.dir")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before

    assert cli(capsys, "train", str(cfg), "-q", "--force", "--set", "train.seed=3")[0] == 0
    steps = [r["step"] for r in log_records(run) if r["kind"] == "step"]
    assert steps == [1, 2, 3, 4, 5]  # one run in the log, not two
    assert (run / "best.safetensors").read_bytes() != before[run / "best.safetensors"]

    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    rc, _, err = cli(capsys, "train", str(cfg), "-q", "--force", "--set", f"output.dir={foreign}")
    assert_one_line_error(rc, err, "is not empty and not a run directory (holds thesis.tex)")
    assert (foreign / "thesis.tex").read_text() == "precious"


@pytest.mark.slow
def test_run_files_respect_the_umask(tmp_path, digits, capsys):
    cfg, run = tiny_cfg(tmp_path, digits)
    old = os.umask(0o022)
    try:
        assert cli(capsys, "train", str(cfg), "-q")[0] == 0
        assert cli(capsys, "plot", str(run), "-o", str(tmp_path / "c.png"), "-q")[0] == 0
    finally:
        os.umask(old)
    files = [p for p in run.rglob("*") if p.is_file()] + [tmp_path / "c.png"]
    assert {"config.yaml", "log.jsonl", "best.safetensors", "step-00000005.pt", "c.png"} <= {p.name for p in files}
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {p.name: "0o644" for p in files}


@pytest.mark.slow
def test_torn_log_line_then_resume_with_more_epochs_and_plot(tmp_path, digits, capsys):
    cfg, run = tiny_cfg(tmp_path, digits)
    assert cli(capsys, "train", str(cfg), "-q")[0] == 0
    with open(run / "log.jsonl", "a") as f:
        f.write('{"kind": "step", "epoch": 2, "st')  # the crash came mid-append
    png = tmp_path / "curves.png"
    assert cli(capsys, "plot", str(run), "-o", str(png), "-q") == (0, f"{png}\n", "")

    rc, _, err = cli(capsys, "train", str(cfg), "-q", "--resume", "--set", "schedule.epochs=2")
    assert rc == 0, err
    records = log_records(run)  # every line parses again
    assert [r["step"] for r in records if r["kind"] == "step"] == list(range(1, 11))
    assert [r for r in records if r["kind"] == "resume"] == [
        {"kind": "resume", "epoch": 1, "step": 5, "checkpoint": str(run / "checkpoints" / "step-00000005.pt"),
         "restart": 0, "world_size": 1, "batch_per_process": 8, "changed": {"schedule.epochs": [1, 2]}}]
    assert load_config(run / "config.yaml").schedule.epochs == 2


@pytest.mark.slow
def test_the_run_directory_records_the_effective_recipe_after_set(tmp_path, digits, capsys):
    """Issue 22 §4: what --set changed (a merged mapping included) is what config.yaml says."""
    cfg, run = tiny_cfg(tmp_path, digits)
    rc, _, err = cli(capsys, "train", str(cfg), "-q", "--set", "optim={lr: 0.05, weight_decay: 0.001}")
    assert rc == 0, err
    recorded = load_config(run / "config.yaml")
    assert (recorded.optim.lr, recorded.optim.weight_decay, recorded.optim.momentum) == (0.05, 0.001, 0.9)
    assert recorded == load_config(cfg, ["optim={lr: 0.05, weight_decay: 0.001}", f"output.dir={run}"])


@pytest.mark.slow
def test_resume_refuses_recipe_changes_it_would_silently_ignore(tmp_path, digits, capsys):
    cfg, run = tiny_cfg(tmp_path, digits)
    assert cli(capsys, "train", str(cfg), "-q")[0] == 0
    config_before = (run / "config.yaml").read_text()
    for change, message in [("optim.lr=0.05", "optim.lr was 0.1, now 0.05"),
                            ("optim.name=adamw", "optim.name was 'sgd', now 'adamw'"),
                            ("model.name=hrnet-w18-small-v2", "model.name was 'hrnet-w18-small', now"),
                            ("model.num_classes=12", "model.num_classes was None, now 12")]:
        rc, _, err = cli(capsys, "train", str(cfg), "-q", "--resume", "--set", change, "--set", "schedule.epochs=2")
        assert_one_line_error(rc, err, "step-00000005.pt", message, "a resumed run keeps the recipe")
    assert (run / "config.yaml").read_text() == config_before
    assert max(r["step"] for r in log_records(run)) == 5


def test_resume_from_something_that_is_not_a_training_checkpoint(tmp_path, digits, capsys):
    cfg, run = tiny_cfg(tmp_path, digits)
    weights = tmp_path / "w.safetensors"
    save_checkpoint(create_model("hrnet-w18-small", num_classes=10), weights)
    plain = tmp_path / "state_dict.pt"
    torch.save(create_model("hrnet-w18-small", num_classes=10).state_dict(), plain)
    for path, message in [(weights, "training checkpoint"),
                          (plain, "not a training checkpoint (no model, optimizer, scheduler)")]:
        rc, _, err = cli(capsys, "train", str(cfg), "-q", "--resume", str(path))
        assert_one_line_error(rc, err, str(path), message, "pass --checkpoint PATH instead of --resume")


@pytest.mark.slow
def test_a_checkpoint_holding_nan_or_inf_is_never_written(tmp_path, digits):
    cfg = load_config(tiny_cfg(tmp_path, digits)[0])
    trainer = Trainer(cfg, quiet=True)
    trainer.fit()  # 5 steps: a good checkpoint, and momentum buffers in the optimizer
    run = Path(cfg.output.dir)
    good = run / "checkpoints" / "step-00000005.pt"
    written = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    momentum = trainer.optimizer.state[trainer.model.classifier.bias]["momentum_buffer"]
    momentum[3] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match=r"optimizer\.state\.\d+\.momentum_buffer holds NaN/Inf at "
                                                    r"step 5 .*did not write .*step-00000005\.pt; the last good "
                                                    rf"checkpoint is {good}"):
        trainer.save()
    momentum[3] = 0.0
    with torch.no_grad():
        trainer.model.stage3[0].branches[1][0].conv1.weight[0, 0, 0, 0] = float("inf")
    with pytest.raises(NonFiniteWeightsError, match=r"model\.stage3\.0\.branches\.1\.0\.conv1\.weight holds NaN/Inf"):
        trainer.save()
    trainer.best_metric = 100.0
    with pytest.raises(NonFiniteWeightsError, match=r"did not write .*best\.safetensors"):
        trainer._export_best()
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == written  # nothing was overwritten


@pytest.mark.parametrize("args, fragments", [
    (["--set", "model.num_classes=1"], ["model.num_classes=1, but data.train has 10 classes",
                                        "set model.num_classes=10 or null"]),
    (["--set", "data.workers=-1"], ["data.workers must be auto, 0"]),
    (["--set", "train.device=tpu"], ["train.device=tpu: not a device"]),
    (["--set", "output.dir={tmp}/file.txt/run"], ["output.dir=", "cannot write there"]),
])
def test_user_mistakes_are_one_line_errors(tmp_path, digits, capsys, args, fragments):
    cfg, _ = tiny_cfg(tmp_path, digits)
    (tmp_path / "file.txt").write_text("")
    rc, _, err = cli(capsys, "train", str(cfg), "-q", *[a.format(tmp=tmp_path) for a in args])
    assert_one_line_error(rc, err, *fragments)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_a_one_line_error(tmp_path, digits, capsys):
    cfg, _ = tiny_cfg(tmp_path, digits)
    rc, _, err = cli(capsys, "train", str(cfg), "--set", "train.device=cuda")
    assert_one_line_error(rc, err, "train.device=cuda: no CUDA GPU is available", "train.device=cpu")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_is_a_one_line_error(tmp_path, digits, capsys):
    cfg, _ = tiny_cfg(tmp_path, digits)
    locked = tmp_path / "ro"
    locked.mkdir(mode=0o500)
    rc, _, err = cli(capsys, "train", str(cfg), "--set", f"output.dir={locked}/run")
    assert_one_line_error(rc, err, "cannot write there (Permission denied)")


@pytest.mark.slow
def test_resume_from_a_fifo_is_refused_instead_of_waiting(tmp_path, digits):
    cfg, _ = tiny_cfg(tmp_path, digits)
    fifo = tmp_path / "step.pt"
    os.mkfifo(fifo)
    [(rc, err)] = run_limited(["train", str(cfg), "--resume", str(fifo)], timeout=120)
    assert_one_line_error(rc, err, f"{fifo}: not a regular file")


# ---- issue 11: the first hour ------------------------------------------------------------------------

@pytest.mark.slow
def test_finetune_recipe_starts_offline_from_a_checkpoint_file(tmp_path, digits, capsys, monkeypatch):
    start = create_model("hrnet-w18-small", num_classes=10)
    weights = tmp_path / "mine.safetensors"
    save_checkpoint(start, weights)
    run = tmp_path / "ft"
    common = ["--set", "model.name=hrnet-w18-small", "--set", f"data.train={digits}/train", "--set",
              f"data.val={digits}/train", "--set", "data.input_size=32", "--set", "data.batch_size=8", "--set",
              "data.workers=0", "--set", "schedule.epochs=1", "--set", "optim.lr=1e-30", "--set",
              f"output.dir={run}"]
    rc, _, err = cli(capsys, "train", "finetune", "--set", f"model.checkpoint={weights}",
                     *common)
    assert_one_line_error(rc, err, "not both", "--checkpoint PATH")
    monkeypatch.setenv("HRNET_OFFLINE", "1")  # no download may be tried
    rc, out, err = cli(capsys, "train", "finetune", "--checkpoint", str(weights), "-q", *common)
    assert rc == 0, err
    best = load_file(run / "best.safetensors")
    for key in ("conv1.weight", "stage4.0.fuse_layers.0.1.0.weight"):  # lr 1e-30 leaves the start unchanged
        assert torch.equal(best[key], start.state_dict()[key]), key
    saved = load_config(run / "config.yaml")
    assert saved.model.checkpoint == str(weights) and not saved.model.pretrained


@pytest.mark.slow
def test_quiet_prints_results_only_and_no_bars_go_into_a_pipe(tmp_path, digits):
    cfg, run = tiny_cfg(tmp_path, digits)
    loud = subprocess.run(hrnet_cmd("train", str(cfg)), env=ENV, capture_output=True, text=True, timeout=300)
    assert loud.returncode == 0, loud.stderr
    assert "\r" not in loud.stderr and "epoch 1/1: loss" in loud.stderr  # a line per epoch, no progress bar
    quiet = subprocess.run(hrnet_cmd("train", str(cfg), "-q", "--force"), env=ENV, capture_output=True, text=True,
                           timeout=300)
    assert quiet.returncode == 0 and quiet.stderr == ""
    for proc in (loud, quiet):
        lines = proc.stdout.splitlines()
        assert lines[0].startswith(f"run: {run}  steps: 5  training accuracy: best ") and ", last " in lines[0]
        assert lines[1:] == [f"weights: {run / 'best.safetensors'}", "classes: " + ", ".join(map(str, range(10))),
                             "started from: random weights (no pretrained weights, no --checkpoint)",
                             f"log: {run / 'log.jsonl'}"]
    plot = subprocess.run(hrnet_cmd("plot", str(run), "-o", str(tmp_path / "c.png"), "-q"), env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert (plot.returncode, plot.stdout, plot.stderr) == (0, f"{tmp_path / 'c.png'}\n", "")


def test_digits_recipe_names_the_command_that_writes_its_data(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, _, err = cli(capsys, "train", "digits")
    assert_one_line_error(rc, err)
    assert err == "hrnet: error: digits/train: data folder not found; run `hrnet data digits digits` first\n"
    recipe = load_config("digits")  # the command writes OUT/train and OUT/val: the recipe's folders
    out = recipe.data.prepare.split()[-1]
    assert recipe.data.prepare == f"hrnet data digits {out}"
    assert (recipe.data.train, recipe.data.val) == (f"{out}/train", f"{out}/val")
