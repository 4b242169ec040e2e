"""Training that survives losing a process (issue 18), on CPU with gloo and torchrun on 127.0.0.1.

- ``--resume auto`` starts or continues; a half-written checkpoint (kill -9 during the write) is never
  picked and its leftovers are removed by the next start;
- torchrun --max-restarts with a rank killed -9 mid-epoch: exit 0, the restart in the log, the weights
  of a run never interrupted;
- SIGTERM to one and to two processes: a checkpoint at the step it stopped, exit code 75, resumable;
- a resume from 2 processes to 1 and from 1 to 2 sees every sample of the epoch exactly once;
- a SIGSTOPped rank ends a 2-process run within the collective timeout, in one line naming the rank.

All runs are tiny (hrnet-w18-small on 40 digits at 32 px, batches of 4 per process) and bounded.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hrnet.training.config import load_config
from hrnet.training.rundir import EXIT_PREEMPTED, claim_run_dir
from hrnet.training.state import checkpoints, load_state, save_state
from hrnet.training.train import train

from helpers import stop_rank_and_expect_one_line, torchrun_argv, worker_pid
from test_train import log_records
from test_train_hardening import digits  # noqa: F401  (the same 32 px digits fixture)

ROOT = Path(__file__).resolve().parent.parent
SRC = str(ROOT / "src")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HRNET_OFFLINE": "1",
       "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}

# 40 images; per process 4: 10 steps per epoch on one process, 5 on two
CFG = """
model: {{name: hrnet-w18-small, drop_rate: 0.1}}
data: {{train: {data}/train, input_size: 32, crop_scale: [0.5, 1.0], batch_size: 4, workers: 0}}
optim: {{lr: 0.2}}
schedule: {{epochs: {epochs}}}
train: {{deterministic: true, seed: 2, collective_timeout_s: {timeout}}}
output: {{dir: {run}, log_every: 1, checkpoint_every: {every}, keep_last: 20}}
"""

pytestmark = pytest.mark.usefixtures("one_thread")


def recipe(tmp_path: Path, digits: Path, run: str, *, epochs: int = 1, every: int = 0, timeout: float = 20) -> Path:
    path = tmp_path / f"{run}.yaml"
    path.write_text(CFG.format(data=digits, run=tmp_path / run, epochs=epochs, every=every, timeout=timeout))
    return path


def hrnet(*args: str) -> list[str]:
    return ["-m", "hrnet", *args]


def wait_for_step(run: Path, step: int, proc: subprocess.Popen, limit: float = 240) -> None:
    deadline = time.time() + limit
    while time.time() < deadline and proc.poll() is None:
        if (run / "log.jsonl").exists() and any(r["step"] >= step for r in log_records(run)):
            return
        time.sleep(0.05)
    raise AssertionError(f"the run did not reach step {step} (exit {proc.poll()})")


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_state(path)["model"]


# ---- --resume auto and half-written checkpoints ------------------------------------------------------

@pytest.mark.slow
def test_resume_auto_starts_then_continues_and_a_restart_implies_it(tmp_path, digits, monkeypatch):
    cfg = load_config(recipe(tmp_path, digits, "auto"))
    first = train(cfg, resume="auto", quiet=True)  # nothing to resume: starts
    assert first.steps == 10
    second = train(load_config(recipe(tmp_path, digits, "auto", epochs=2)), resume="auto", quiet=True)
    assert second.steps == 20  # continued from step 10, not started afresh
    resumed = [r for r in log_records(tmp_path / "auto") if r["kind"] == "resume"]
    assert [(r["step"], r["restart"]) for r in resumed] == [(10, 0)]
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # what torchrun sets in a restarted group
    third = train(load_config(recipe(tmp_path, digits, "auto", epochs=3)), quiet=True)
    assert third.steps == 30
    assert [r["restart"] for r in log_records(tmp_path / "auto") if r["kind"] == "resume"] == [0, 1]


@pytest.mark.slow
def test_resume_auto_discards_an_attempt_that_left_no_checkpoint(tmp_path, digits):
    run = tmp_path / "early"
    run.mkdir()
    (run / "log.jsonl").write_text('{"kind": "step", "step": 1, "loss": 9.0}\n')  # died before its checkpoint
    result = train(load_config(recipe(tmp_path, digits, "early")), resume="auto", quiet=True)
    assert result.steps == 10 and [r["step"] for r in log_records(run) if r["kind"] == "step"] == list(range(1, 11))


WRITER = """
import sys, torch
from pathlib import Path
from hrnet.training.state import save_state
state = {"model": {"w": torch.randn(64, 2**20)}}  # 256 MB: a write that takes a while
for step in range(1, 100):
    save_state(state, Path(sys.argv[1]) / f"step-{step:08d}.pt")
"""


@pytest.mark.slow
def test_kill_9_during_a_checkpoint_write_never_leaves_a_pickable_half_file(tmp_path, digits):
    run = tmp_path / "torn"
    ckpt = run / "checkpoints"
    ckpt.mkdir(parents=True)
    complete = {"model": {"w": torch.ones(3)}, "optimizer": {}, "scheduler": {}, "scaler": {}, "epoch": 0,
                "batch_in_epoch": 0, "step": 0, "epoch_sums": [], "rng": [], "world_size": 1, "global_batch": 4}
    save_state(complete, ckpt / "step-00000000.pt")
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(ckpt)], env=ENV)
    deadline = time.time() + 120
    while time.time() < deadline and not any(".part" in p.name and p.stat().st_size > 2**20
                                             for p in ckpt.iterdir()):
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    leftovers = [p for p in ckpt.iterdir() if ".part" in p.name]
    assert leftovers, "the kill should land in the middle of a write"
    newest = checkpoints(ckpt)[-1]
    load_state(newest)  # whatever is listed is complete
    assert all(p not in checkpoints(ckpt) for p in leftovers)
    with claim_run_dir(run, resume=True):  # what every start and resume does first
        pass
    assert not [p for p in ckpt.iterdir() if ".part" in p.name]


# ---- SIGTERM -----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_sigterm_to_one_process_checkpoints_the_step_and_resume_continues(tmp_path, digits):
    cfg = recipe(tmp_path, digits, "term1", epochs=2)
    run = tmp_path / "term1"
    proc = subprocess.Popen([sys.executable, *hrnet("train", str(cfg), "-q")], env=ENV, stderr=subprocess.PIPE,
                            text=True)
    wait_for_step(run, 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err
    stopped = [r for r in log_records(run) if r["kind"] == "stopped"]
    assert len(stopped) == 1 and stopped[0]["signal"] == "SIGTERM"
    step = stopped[0]["step"]
    assert 3 <= step < 10 and load_state(checkpoints(run / "checkpoints")[-1])["step"] == step
    assert max(r["step"] for r in log_records(run) if r["kind"] == "step") == step  # at most the step in flight
    assert "SIGTERM: stopped after step" in err
    subprocess.run([sys.executable, *hrnet("train", str(cfg), "-q", "--resume", "auto")], env=ENV, check=True,
                   timeout=300)
    steps = [r["step"] for r in log_records(run) if r["kind"] == "step"]
    assert steps == list(range(1, 21))


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path, digits):
    cfg = recipe(tmp_path, digits, "term2", epochs=2)
    run = tmp_path / "term2"
    proc = subprocess.Popen(torchrun_argv(*hrnet("train", str(cfg), "-q")), env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    wait_for_step(run, 2, proc)
    os.kill(worker_pid(proc.pid, 1), signal.SIGTERM)  # one rank only: both must stop together
    out, _ = proc.communicate(timeout=120)
    assert f"exitcode  : {EXIT_PREEMPTED}" in out, out[-3000:]  # the documented code, not a crash
    stopped = [r for r in log_records(run) if r["kind"] == "stopped"]
    assert len(stopped) == 1, out[-3000:]
    step = stopped[0]["step"]
    assert load_state(checkpoints(run / "checkpoints")[-1])["step"] == step < 10
    subprocess.run(torchrun_argv(*hrnet("train", str(cfg), "-q", "--resume")), env=ENV, check=True, timeout=300,
                   capture_output=True)
    assert [r["step"] for r in log_records(run) if r["kind"] == "step"] == list(range(1, 11))


# ---- torchrun --max-restarts with a rank killed -9 -------------------------------------------------

@pytest.mark.slow
def test_a_rank_killed_mid_epoch_is_restarted_by_torchrun_and_ends_with_the_same_weights(tmp_path, digits):
    straight = recipe(tmp_path, digits, "straight", epochs=2, every=2)
    subprocess.run(torchrun_argv(*hrnet("train", str(straight), "-q")), env=ENV, check=True, timeout=300,
                   capture_output=True)
    cfg = recipe(tmp_path, digits, "elastic", epochs=2, every=2)
    run = tmp_path / "elastic"
    proc = subprocess.Popen(torchrun_argv(*hrnet("train", str(cfg), "-q", "--resume", "auto"), restarts=2), env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_step(run, 7, proc)  # epoch 2 (steps 6-10), past the checkpoint of step 6
    os.kill(worker_pid(proc.pid, 1), signal.SIGKILL)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    resumed = [r for r in log_records(run) if r["kind"] == "resume"]
    assert resumed and resumed[0]["restart"] >= 1 and all(r["step"] in (6, 8) for r in resumed), resumed
    steps = [r["step"] for r in log_records(run) if r["kind"] == "step"]
    assert steps == list(range(1, 11))  # the log repeats nothing
    a = weights(tmp_path / "straight" / "checkpoints" / "step-00000010.pt")
    b = weights(run / "checkpoints" / "step-00000010.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)  # deterministic mode: bit for bit


JOIN = """
import sys, torch
from hrnet.distributed import all_reduce_sum, cleanup, init_distributed
init_distributed("cpu", 15)
t = torch.ones(1)
all_reduce_sum(t)
cleanup()
print(int(t.item()))
"""


@pytest.mark.slow
def test_a_restarted_round_never_reads_the_gloo_addresses_of_the_round_before(tmp_path):
    """torchrun's agent keeps one store server for all its restarts: round 2's rank 0, starting before
    round 2's rank 1, must wait for the new rank 1, not connect to the dead one's address from round 1
    (the cause of a CI failure: 'Gloo connectFullMesh failed ... Connect timeout' after every restart)."""
    import torch.distributed as dist
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)

    def start(rank: int, restart: int) -> subprocess.Popen:
        env = {**ENV, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(server.port), "TORCHELASTIC_USE_AGENT_STORE": "True",
               "TORCHELASTIC_RESTART_COUNT": str(restart)}
        return subprocess.Popen([sys.executable, "-c", JOIN], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    for restart, late in ((0, 0.0), (1, 8.0)):
        first = start(0, restart)
        time.sleep(late)  # round 2: rank 0 has long read the store when rank 1 arrives
        second = start(1, restart)
        outs = [p.communicate(timeout=120)[0] for p in (first, second)]
        assert [p.returncode for p in (first, second)] == [0, 0], outs
        assert [o.split()[-1] for o in outs] == ["2", "2"]


# ---- another number of processes ---------------------------------------------------------------------

RECORDING_DRIVER = """
import os, signal, sys
from pathlib import Path
from hrnet.data import ImageDataset
from hrnet.distributed import cleanup
from hrnet.training.config import load_config
from hrnet.training.train import train, build_datasets

class Recording:
    '''The training set, writing each index it serves to a file; sends this process SIGTERM when it has
    served ``stop_after`` samples (0: never), so the run stops after that sample's step.'''
    def __init__(self, data, log, stop_after):
        self.data, self.classes, self.log, self.stop_after, self.served = data, data.classes, log, stop_after, 0
    def __len__(self):
        return len(self.data)
    def __getitem__(self, i):
        with open(self.log, "a") as f:
            f.write(f"{i}\\n")
        self.served += 1
        if self.served == self.stop_after:
            os.kill(os.getpid(), signal.SIGTERM)
        return self.data[i]

cfg = load_config(sys.argv[1], [])
rank = os.environ.get("RANK", "0")
data = Recording(build_datasets(cfg)[0], f"{sys.argv[2]}.{rank}", int(sys.argv[3]) if rank == "0" else 0)
result = train(cfg, resume=sys.argv[4] == "resume", quiet=True, train_set=data)
cleanup()
sys.exit(75 if result.stopped_by else 0)
"""


def seen(prefix: Path) -> list[int]:
    return [int(line) for p in prefix.parent.glob(prefix.name + ".*") for line in p.read_text().split()]


@pytest.mark.slow
@pytest.mark.parametrize("first, then", [(2, 1), (1, 2)])
def test_a_resume_on_another_number_of_processes_sees_each_sample_once(tmp_path, digits, first, then):
    driver = tmp_path / "driver.py"
    driver.write_text(RECORDING_DRIVER)
    # the global batch is 8 throughout: 4 per process on two, or 8 on one
    cfg = recipe(tmp_path, digits, "resize")
    if first == 1:
        cfg.write_text(cfg.read_text().replace("batch_size: 4", "batch_size: 8"))

    def launch(n: int, log: str, stop_after: int, mode: str) -> subprocess.CompletedProcess:
        cmd = torchrun_argv(str(driver)) if n == 2 else [sys.executable, str(driver)]
        return subprocess.run([*cmd, str(cfg), str(tmp_path / log), str(stop_after), mode], env=ENV,
                              capture_output=True, text=True, timeout=300)

    a = launch(first, "a", 10 // first, "start")  # stops in the step of its 10th / 5th sample: step 2
    assert "stopped" in [r["kind"] for r in log_records(tmp_path / "resize")], a.stdout[-2000:] + a.stderr[-2000:]
    assert load_state(checkpoints(tmp_path / "resize" / "checkpoints")[-1])["step"] == 2
    b = launch(then, "b", 0, "resume")
    assert b.returncode == 0, b.stdout[-2000:] + b.stderr[-2000:]
    before, after = seen(tmp_path / "a"), seen(tmp_path / "b")
    assert len(before) == 16 and len(after) == 24
    assert sorted(before + after) == list(range(40))  # every sample of the epoch exactly once
    resumed = [r for r in log_records(tmp_path / "resize") if r["kind"] == "resume"][0]
    assert (resumed["previous_world_size"], resumed["world_size"], resumed["batch_per_process"]) == \
        (first, then, 8 // then)


def test_a_global_batch_the_new_world_size_cannot_split_is_refused_with_the_options(tmp_path, digits, monkeypatch):
    from hrnet.training.config import ConfigError
    from hrnet.training.train import Trainer
    cfg = load_config(recipe(tmp_path, digits, "odd"))
    monkeypatch.setattr("hrnet.training.train.init_distributed",
                        lambda *a: __import__("hrnet.distributed").distributed.DistInfo(0, 3, 0, "cpu"))
    with pytest.raises(ConfigError, match=r"ck\.pt: the run's global batch is 8; 3 processes cannot split it "
                                          r"evenly; resume on 1, 2, 4, 8 \.\.\. processes"):
        Trainer(cfg, quiet=True, global_batch=8, source="ck.pt")


# ---- a hung rank -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_stopped_rank_ends_a_two_process_training_within_the_timeout(tmp_path, digits):
    cfg = recipe(tmp_path, digits, "hung", epochs=3, timeout=5)
    run = tmp_path / "hung"
    proc = subprocess.Popen(torchrun_argv(*hrnet("train", str(cfg), "-q")), env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    wait_for_step(run, 2, proc)
    stop_rank_and_expect_one_line(proc, 1, timeout_s=5)
