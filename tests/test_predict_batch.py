"""hrnet predict --output: streamed JSON lines equal to hrnet.predict's records, survive kill -9 and a torn
line, resume (also with another number of processes), refuse to overwrite, and shard under torchrun."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import run_limited, stop_rank_and_expect_one_line, torchrun_argv
from hrnet.cli import main
from hrnet.inference.batch import part_path
from hrnet.inference.predict import predict
from test_data import make_bad_corpus
from test_predict import CROP, FAST, MODEL, model_and_photos

SRC = str(Path(__file__).resolve().parents[1] / "src")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([SRC, *sys.path])}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Seven photos and two bad files (an odd nine inputs with a missing one), the checkpoint, and the
    records hrnet.predict gives for them, checked against the independent reference ranking."""
    d = tmp_path_factory.mktemp("batch")
    model, ckpt, photos, logits = model_and_photos(d)
    _, bad = make_bad_corpus(d / "corpus")
    inputs = [str(photos[0].parent), *(str(d / "corpus" / b) for b in bad[:1]), str(d / "missing.jpg")]
    expected = predict(model, inputs, input_size=CROP, workers=0)
    for r in expected[:len(photos)]:
        assert r["topk"][0]["index"] == int(logits[photos.index(Path(r["file"]))].argmax())
    assert len(expected) == 9 and [("error" in r) for r in expected] == [False] * 7 + [True] * 2
    return ckpt, inputs, expected


def argv(ckpt: Path, inputs: list[str], out: Path, *extra: str) -> list[str]:
    return ["predict", MODEL, "--checkpoint", str(ckpt), *inputs, "--output", str(out), *FAST, *extra]


def read_lines(path: Path) -> list[dict]:
    text = path.read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def assert_same_records(got: list[dict], expected: list[dict]) -> None:
    """Same files in the same order, each once; the same ranking, probabilities to 1e-5."""
    assert [r["file"] for r in got] == [r["file"] for r in expected]
    for g, e in zip(got, expected):
        assert set(g) == set(e), g["file"]
        if "error" in e:
            assert g["error"] == e["error"]
        else:
            assert [(t["index"], t["label"]) for t in g["topk"]] == [(t["index"], t["label"]) for t in e["topk"]]
            np.testing.assert_allclose([t["score"] for t in g["topk"]], [t["score"] for t in e["topk"]], atol=1e-5)


def summary(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


def test_output_holds_the_records_of_predict_bad_files_included(setup, tmp_path, capsys):
    ckpt, inputs, expected = setup
    out = tmp_path / "sub" / "preds.jsonl"
    assert main(argv(ckpt, inputs, out, "--json", "--batch-size", "3")) == 0
    assert summary(capsys) == {"output": str(out), "files": 9, "done": 9, "skipped": 0, "errors": 2}
    got = read_lines(out)
    assert_same_records(got, expected)
    assert "missing.jpg: no such file" in got[-1]["error"]


def test_an_existing_output_is_refused_without_resume(setup, tmp_path, capsys):
    ckpt, inputs, _ = setup
    out = tmp_path / "preds.jsonl"
    out.write_text('{"file": "precious"}\n')
    assert main(argv(ckpt, inputs, out)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(out) in err and "--resume" in err
    assert out.read_text() == '{"file": "precious"}\n'
    out.unlink()
    part_path(out, 1, 2).write_text('{"file": "x"}\n')  # an interrupted torchrun run's part
    assert main(argv(ckpt, inputs, out)) == 1
    assert "interrupted run" in capsys.readouterr().err and not out.exists()


def test_resume_refuses_a_file_that_is_not_ours(setup, tmp_path, capsys):
    ckpt, inputs, _ = setup
    out = tmp_path / "notes.txt"
    out.write_text("shopping list\nmilk\n")
    assert main(argv(ckpt, inputs, out, "--resume")) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "line 1 is not a prediction record" in err
    assert out.read_text() == "shopping list\nmilk\n"


def test_a_torn_last_line_is_dropped_and_resume_completes_the_file(setup, tmp_path, capsys):
    ckpt, inputs, expected = setup
    out = tmp_path / "preds.jsonl"
    lines = [json.dumps(r) + "\n" for r in expected]
    out.write_text("".join(lines[:3]) + lines[3][:25])  # three records, then half of the fourth
    assert main(argv(ckpt, inputs, out, "--resume", "--json")) == 0
    assert summary(capsys) == {"output": str(out), "files": 9, "done": 6, "skipped": 3, "errors": 2}
    assert_same_records(read_lines(out), expected)


@pytest.mark.slow
def test_a_run_killed_mid_way_resumes_to_every_file_once(setup, tmp_path, capsys):
    ckpt, inputs, expected = setup
    photos = Path(inputs[0])
    many = tmp_path / "many"
    for i in range(6):  # 42 photos, one per batch: the kill lands long before the end
        shutil.copytree(photos, many / f"copy{i}")
    full = predict(MODEL, [str(many)], checkpoint=ckpt, input_size=CROP, workers=0)
    out = tmp_path / "preds.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "hrnet", *argv(ckpt, [str(many)], out, "--batch-size", "1")],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (out.exists() and out.read_bytes().count(b"\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = out.read_bytes()
    assert 2 <= killed.count(b"\n") < len(full), "the run ended before it was killed"
    assert main(argv(ckpt, [str(many)], out, "--resume", "--json")) == 0
    result = summary(capsys)
    assert result["skipped"] == killed.count(b"\n") and result["done"] + result["skipped"] == len(full)
    assert_same_records(read_lines(out), full)


def test_resume_from_parts_of_an_interrupted_torchrun_in_one_process(setup, tmp_path, capsys):
    ckpt, inputs, expected = setup
    out = tmp_path / "preds.jsonl"
    lines = [json.dumps(r) + "\n" for r in expected]
    part_path(out, 0, 2).write_text(lines[0] + lines[2])
    part_path(out, 1, 2).write_text(lines[1] + lines[3][:-10])  # killed while writing its second record
    assert main(argv(ckpt, inputs, out, "--resume", "--json")) == 0
    assert summary(capsys)["skipped"] == 3
    assert_same_records(read_lines(out), expected)
    assert sorted(os.listdir(tmp_path)) == ["preds.jsonl"]  # parts merged and removed, no temporary left


def torchrun(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(torchrun_argv("-m", "hrnet", *args), capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_torchrun_two_processes_write_every_file_once_as_one_process_does(setup, tmp_path):
    ckpt, inputs, expected = setup
    single = tmp_path / "single.jsonl"
    assert main(argv(ckpt, inputs, single, "--batch-size", "2")) == 0
    out = tmp_path / "dist" / "preds.jsonl"
    proc = torchrun(*argv(ckpt, inputs, out, "--json", "--batch-size", "2"))
    assert json.loads(proc.stdout) == {"output": str(out), "files": 9, "done": 9, "skipped": 0, "errors": 2}
    assert_same_records(read_lines(out), read_lines(single))
    assert_same_records(read_lines(out), expected)
    assert os.listdir(out.parent) == ["preds.jsonl"]


@pytest.mark.slow
def test_torchrun_resumes_a_run_of_another_world_size(setup, tmp_path):
    ckpt, inputs, expected = setup
    out = tmp_path / "preds.jsonl"
    lines = [json.dumps(r) + "\n" for r in expected]
    out.write_text(lines[0])  # a finished single-process run had written one record ...
    part_path(out, 0, 3).write_text(lines[1] + lines[4])  # ... then a 3-process run was killed
    part_path(out, 2, 3).write_text(lines[8] + lines[5][:7])
    proc = torchrun(*argv(ckpt, inputs, out, "--resume", "--json"))
    assert json.loads(proc.stdout) == {"output": str(out), "files": 9, "done": 5, "skipped": 4, "errors": 1}
    assert_same_records(read_lines(out), expected)
    assert os.listdir(tmp_path) == ["preds.jsonl"]


MERGE = """
    import sys
    from pathlib import Path
    from hrnet.inference.batch import merge
    out, n, parts = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    merge(out, [Path(p) for p in parts], [f"img{i:06d}.jpg" for i in range(n)])
"""


@pytest.mark.slow
def test_merge_streams_records_it_could_not_hold_in_memory(tmp_path):
    """4,000 records of 40 kB (160 MB) from three out-of-order parts (one record repeated), merged in a
    process allowed 64 MB more than its imports: it must stream, and put every file once, in input order."""
    n, pad = 4000, "x" * 40_000
    order = np.random.default_rng(0).permutation(n)
    parts = [tmp_path / f"preds.jsonl.rank-0000{r}-of-00003" for r in range(3)]
    for r, part in enumerate(parts):
        with open(part, "w") as f:
            for i in order[r::3]:
                f.write(json.dumps({"file": f"img{i:06d}.jpg", "error": pad}) + "\n")
    with open(parts[2], "a") as f:  # a record also in an earlier source (parts left by a merge that crashed)
        f.write(json.dumps({"file": f"img{order[0]:06d}.jpg", "error": "a duplicate"}) + "\n")
    done = run_limited(MERGE, str(tmp_path / "preds.jsonl"), str(n), *map(str, parts), extra_bytes=64 << 20)
    assert done.returncode == 0, done.stderr[-2000:]
    with open(tmp_path / "preds.jsonl") as f:
        for i, line in enumerate(f):
            assert json.loads(line) == {"file": f"img{i:06d}.jpg", "error": pad}
    assert i == n - 1


def test_output_of_only_bad_files_holds_their_errors_and_fails(setup, tmp_path, capsys):
    ckpt, inputs, expected = setup
    out = tmp_path / "preds.jsonl"
    assert main(argv(ckpt, inputs[1:], out)) == 1
    captured = capsys.readouterr()
    assert "no input could be classified" in captured.err
    assert captured.out == f"{out}: 2 records written (2 errors), 0 files already done, 2 in all\n"
    assert read_lines(out) == expected[-2:]


def _copies(ckpt: Path, inputs: list[str], tmp_path: Path, n: int) -> tuple[Path, list[dict]]:
    """``tmp_path/many``: ``n`` copies of the photo folder (enough work for a run to be caught mid-way),
    and the records hrnet.predict gives for it."""
    many = tmp_path / "many"
    for i in range(n):
        shutil.copytree(Path(inputs[0]), many / f"copy{i}")
    return many, predict(MODEL, [str(many)], checkpoint=ckpt, input_size=CROP, workers=0)


def _start(ckpt: Path, inputs: list[str], out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "hrnet", *argv(ckpt, inputs, out, "--batch-size", "1", *extra)],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for_lines(out: Path, proc: subprocess.Popen, lines: int, deadline: float) -> None:
    while not (out.exists() and out.read_bytes().count(b"\n") >= lines):
        assert proc.poll() is None and time.monotonic() < deadline, (proc.stderr or proc.stdout).read()
        time.sleep(0.01)


@pytest.mark.slow
def test_a_second_run_on_one_output_is_refused_naming_the_first_and_a_kill_resumes_to_every_file_once(
        setup, tmp_path, capsys):
    """Issue 22: two runs on one --output doubled every record. The second is refused in one line with
    the first one's pid; after the first is killed -9, --resume leaves each input exactly once."""
    ckpt, inputs, expected = setup
    many, full = _copies(ckpt, inputs, tmp_path, 6)
    out = tmp_path / "preds.jsonl"
    first = _start(ckpt, [str(many)], out)
    try:
        _wait_for_lines(out, first, 1, time.monotonic() + 120)
        assert main(argv(ckpt, [str(many)], out)) == 1  # without --resume
        assert main(argv(ckpt, [str(many)], out, "--resume")) == 1  # with it
        errors = capsys.readouterr().err.splitlines()
        assert len(errors) == 2 and all(e.startswith(f"hrnet: error: {out}: ") and f"(pid {first.pid})" in e
                                        for e in errors), errors
        assert first.poll() is None, "the first run ended before the second was refused"
    finally:
        first.kill()
        first.wait()
    assert main(argv(ckpt, [str(many)], out, "--resume", "--json")) == 0
    assert_same_records(read_lines(out), full)
    assert sorted(os.listdir(tmp_path)) == ["many", "preds.jsonl"]  # the lock file is gone with its run


@pytest.mark.slow
def test_concurrent_resumes_never_lose_or_double_a_record(setup, tmp_path):
    """Issue 22: two --resume runs at once lost records, exit 0. Now at most one runs at a time; the other
    is refused in one line, and whatever mix happened, the file ends with every input exactly once."""
    ckpt, inputs, _ = setup
    many, full = _copies(ckpt, inputs, tmp_path, 4)
    out = tmp_path / "preds.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in full[:3]))
    procs = [_start(ckpt, [str(many)], out, "--resume") for _ in range(2)]
    for p in procs:
        p.wait(timeout=300)
    refused = [p for p in procs if p.returncode]
    for p in refused:
        err = p.stderr.read()
        assert err.startswith("hrnet: error: ") and "another hrnet predict --output" in err and err.count("\n") == 1
    assert len(refused) <= 1
    assert_same_records(read_lines(out), full)


@pytest.mark.slow
def test_a_stopped_rank_ends_a_torchrun_run_within_the_timeout_and_resume_keeps_what_was_written(
        setup, tmp_path, capsys):
    """Issue 18: rank 0 waited for rank 1's 'done' marker for ever. A SIGSTOPped rank 1 now ends the job
    within the collective timeout in one line naming it; every record written before is kept, and
    --resume in one process writes the rest, each input once."""
    ckpt, inputs, _ = setup
    many, full = _copies(ckpt, inputs, tmp_path, 6)
    out = tmp_path / "preds.jsonl"
    proc = subprocess.Popen(torchrun_argv("-m", "hrnet", *argv(ckpt, [str(many)], out, "--batch-size", "1")),
                            env={**ENV, "HRNET_COLLECTIVE_TIMEOUT_S": "5"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    _wait_for_lines(part_path(out, 1, 2), proc, 2, time.monotonic() + 120)
    out_text = stop_rank_and_expect_one_line(proc, 1, timeout_s=5)
    assert f"{out}: waiting for the other ranks' records" in out_text
    finished = sum(p.read_bytes().count(b"\n") for p in (part_path(out, 0, 2), part_path(out, 1, 2)))
    assert 2 < finished < len(full)
    assert main(argv(ckpt, [str(many)], out, "--resume", "--json")) == 0
    assert summary(capsys)["skipped"] == finished  # nothing written before the stop is redone
    assert_same_records(read_lines(out), full)
    assert sorted(os.listdir(tmp_path)) == ["many", "preds.jsonl"]
