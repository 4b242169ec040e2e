"""Every user error is one line: wrong arguments and hostile machine states, command by command.

Each probe runs ``hrnet.cli.main`` in-process (or, where a process could die or a machine state must
be simulated, a child process) and must end with exit code 1 or 2, exactly one error line that names
the argument or file at fault, and no traceback.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hrnet.builder import create_model
from hrnet.cli import main
from hrnet.deploy.bench import bench, bench_here
from hrnet.errors import UsageError
from hrnet.models import count_flops

SRC = Path(__file__).resolve().parents[1] / "src"


def assert_one_line(code: int, err: str, *fragments: str) -> None:
    """Exit 1 or 2, no traceback, exactly one error line, holding every fragment."""
    assert code in (1, 2), (code, err)
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    for fragment in fragments:
        assert fragment in errors[0], (fragment, err)


def cli(capsys, *argv: str) -> tuple[int, str]:
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """A folder with a small checkpoint, an image, a class folder, a regular file and a FIFO."""
    from PIL import Image

    d = tmp_path_factory.mktemp("hostile_cli")
    save_file(create_model("hrnet-w18-small").state_dict(), str(d / "small.safetensors"))
    Image.new("RGB", (40, 40), (200, 10, 10)).save(d / "img.png")
    (d / "val" / "n01440764").mkdir(parents=True)
    Image.new("RGB", (40, 40), (10, 200, 10)).save(d / "val" / "n01440764" / "a.png")
    (d / "afile").write_text("not a folder\n")
    (d / "adir").mkdir()
    os.mkfifo(d / "fifo")
    (d / "bad.onnx").write_bytes(b"not a protobuf at all")
    return d


# (argv with {d} for the fixture folder, fragments the error line must hold). Each of these showed a
# traceback, exited 0, or named nothing before this change (checked against main at 0d6d320).
PROBES = [
    ("flops hrnet-w18 --input-size 0 0", ["argument --input-size", "'0'"]),
    ("flops hrnet-w18 --input-size -5 10", ["argument --input-size", "'-5'"]),
    ("flops hrnet-w18 --input-size 100000 100000", ["argument --input-size", "'100000'"]),
    ("bench hrnet-w18-small --iters 0", ["argument --iters", "'0'"]),
    ("bench hrnet-w18-small --batch-size 0", ["argument --batch-size", "'0'"]),
    ("bench hrnet-w18-small --warmup -1", ["argument --warmup", "'-1'"]),
    ("bench hrnet-w18-small --threads -1", ["argument --threads", "'-1'"]),
    ("bench hrnet-w18-small --input-size 0 0", ["argument --input-size", "'0'"]),
    ("cam hrnet-w18-small --checkpoint {d}/small.safetensors {d}/img.png -o {d}/o.png --input-size 0",
     ["argument --input-size", "'0'"]),
    ("cam hrnet-w18-small --checkpoint {d}/small.safetensors {d}/img.png -o {d}/adir",
     ["argument -o/--output", "adir"]),
    ("cam hrnet-w18-small --checkpoint {d}/small.safetensors {d}/img.png -o {d}/o.xyz",
     ["argument -o/--output", "o.xyz"]),
    ("export hrnet-w18-small --checkpoint {d}/small.safetensors -o {d}/e.onnx --input-size 0 0 --no-check",
     ["argument --input-size", "'0'"]),
    ("export hrnet-w18-small --checkpoint {d}/small.safetensors -o {d}/e.onnx --opset 0 --no-check",
     ["argument --opset", "'0'"]),
    ("export hrnet-w18-small --checkpoint {d}/small.safetensors -o {d}/e.onnx --opset 17 --no-check",
     ["argument --opset", "'17'"]),  # silently written as opset 18 before
    ("export hrnet-w18-small --checkpoint {d}/small.safetensors -o {d}/e.onnx --opset 999 --no-check",
     ["argument --opset", "'999'"]),
    ("compare hrnet-w18-small --checkpoint {d}/small.safetensors --data {d}/val eager fused --batch-size 0",
     ["argument --batch-size", "'0'"]),
    ("compare hrnet-w18-small --checkpoint {d}/small.safetensors --data {d}/val eager fused --workers -1",
     ["argument --workers", "'-1'"]),
    ("compare hrnet-w18-small --checkpoint {d}/small.safetensors --data {d}/val eager fused --show -1",
     ["argument --show", "'-1'"]),
    ("compare hrnet-w18-small --checkpoint {d}/small.safetensors --data {d}/val eager fused --input-size 0",
     ["argument --input-size", "'0'"]),
    ("quantize hrnet-w18-small --checkpoint {d}/small.safetensors --calib {d}/val -o {d}/q.onnx --input-size 0",
     ["argument --input-size", "'0'"]),
    ("serve hrnet-w18-small --checkpoint {d}/small.safetensors --port -1", ["argument --port", "'-1'"]),
    ("serve hrnet-w18-small --checkpoint {d}/small.safetensors --port 70000", ["argument --port", "'70000'"]),
    ("serve hrnet-w18-small --checkpoint {d}/small.safetensors --input-size 0", ["argument --input-size", "'0'"]),
    ("train {d}/adir", ["adir", "not a regular file"]),
    ("plot {d}/fifo", ["fifo", "no training log"]),
    ("compare hrnet-w18-small --checkpoint {d}/small.safetensors --data {d}/val eager {d}/bad.onnx",
     ["bad.onnx", "onnxruntime cannot load it"]),
]

# Already one line before this change; kept so they stay so (with PROBES' first, the before-stop hook's).
GUARDED = [
    ("predict hrnet-w18 --topk 0 {d}/img.png", ["argument --topk", "'0'"]),
    ("info no-such-model", ["unknown model 'no-such-model'"]),
    ("eval hrnet-w18 --batch-size 0 --data {d}/val", ["argument --batch-size", "'0'"]),
    ("export hrnet-w18-small -o {d}/e.onnx --batch 0", ["argument --batch", "'0'"]),
    ("quantize hrnet-w18-small --checkpoint {d}/small.safetensors --calib {d}/val -o {d}/q.onnx --num-images 0",
     ["--num-images"]),
    ("cam hrnet-w18-small --checkpoint {d}/fifo {d}/img.png -o {d}/o.png", ["fifo", "not a regular file"]),
    ("cam hrnet-w18-small --checkpoint {d}/afile/x.pth {d}/img.png -o {d}/o.png", ["afile/x.pth", "Not a directory"]),
    ("convert {d}/small.safetensors {d}/adir", ["adir", "Is a directory"]),
    ("convert {d}/fifo {d}/x.safetensors", ["fifo", "not a regular file"]),
    ("export hrnet-w18-small --checkpoint {d}/small.safetensors -o {d}/adir --format onnx --no-check",
     ["adir", "Is a directory"]),
    ("data digits {d}/afile", ["afile", "already exists"]),
]


@pytest.mark.parametrize("argv, fragments", PROBES + GUARDED,
                         ids=[p[0].replace(" --checkpoint {d}/small.safetensors", "").replace("{d}/", "")
                              for p in PROBES + GUARDED])
def test_a_wrong_argument_is_one_line(files, capsys, monkeypatch, argv, fragments):
    monkeypatch.setenv("HRNET_OFFLINE", "1")
    monkeypatch.delenv("HRNET_DEBUG", raising=False)
    code, err = cli(capsys, *argv.format(d=files).split())
    assert_one_line(code, err, *fragments)


def test_hrnet_debug_shows_the_traceback_instead(files, monkeypatch):
    monkeypatch.setenv("HRNET_DEBUG", "1")
    monkeypatch.setenv("HRNET_OFFLINE", "1")
    with pytest.raises(Exception, match="unknown model"):
        main(["info", "no-such-model"])


@pytest.mark.parametrize("size", [(0, 0), (-5, 10), (224,), (1.5, 2)])
def test_count_flops_refuses_a_size_out_of_range(size):
    with pytest.raises(UsageError, match="input size"):
        count_flops(create_model("hrnet-w18-small"), size)


@pytest.mark.parametrize("options, name", [({"iters": 0}, "iters"), ({"batch_size": 0}, "batch_size"),
                                           ({"warmup": -1}, "warmup"), ({"threads": -2}, "threads"),
                                           ({"input_size": (0, 224)}, "input_size")])
def test_bench_refuses_counts_out_of_range_before_building_anything(options, name):
    for run in (bench_here, bench):  # in this process, and before a child process is started
        with pytest.raises(UsageError, match=f"^{name} out of range"):
            run("hrnet-w18-small", "eager", **options)


def run_child(args: list[str], fsize: int | None = None, timeout: float = 300) -> tuple[int, str]:
    """``python -m hrnet ARGS`` in a child, optionally with files capped at ``fsize`` bytes (a full disk)."""
    def limit() -> None:
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    env = dict(os.environ, PYTHONPATH=str(SRC), OMP_NUM_THREADS="1", HRNET_OFFLINE="1")
    env.pop("HRNET_DEBUG", None)
    p = subprocess.run([sys.executable, "-m", "hrnet", *args], capture_output=True, text=True, timeout=timeout,
                       env=env, preexec_fn=limit)
    return p.returncode, p.stderr


@pytest.mark.slow
def test_bench_reports_a_bad_checkpoint_in_the_child_as_its_message(files):
    code, err = run_child(["bench", "hrnet-w18-small", "--backend", "eager", "--iters", "1", "--warmup", "0",
                           "--input-size", "32", "32", "--checkpoint", str(files / "afile")])
    assert_one_line(code, err, "afile: not a checkpoint")
    assert "CheckpointError" not in err  # the child's message, not its exception's repr


@pytest.mark.slow
@pytest.mark.parametrize("command, suffix", [("export", ".pt2"), ("export", ".onnx"), ("cam", ".png")])
def test_a_full_disk_keeps_the_old_file_and_says_so_in_one_line(files, tmp_path, command, suffix):
    """RLIMIT_FSIZE stands in for a full disk. Before: .pt2 aborted the interpreter (rc 134) and cam
    truncated the old picture and named no file."""
    old = tmp_path / f"model{suffix}"
    old.write_bytes(b"the previous good file")
    model = ["hrnet-w18-small", "--checkpoint", str(files / "small.safetensors")]
    args = ([command, *model, "-o", str(old), "--input-size", "32", "32", "--no-check", "-q"] if command == "export"
            else [command, *model, str(files / "img.png"), "-o", str(old)])
    code, err = run_child(args, fsize=3000 if command == "cam" else 200_000)
    assert_one_line(code, err, f"cannot write {old}", "File too large")
    assert old.read_bytes() == b"the previous good file"
    assert sorted(p.name for p in tmp_path.iterdir()) == [old.name]  # no temporary file left behind


@pytest.mark.slow
def test_data_digits_onto_a_full_disk_names_the_folder_and_leaves_nothing(tmp_path):
    code, err = run_child(["data", "digits", str(tmp_path / "d")], fsize=100)
    assert_one_line(code, err, f"cannot write {tmp_path / 'd'}", "File too large")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("home", ["afile/home", "fifo"])
def test_an_unusable_hrnet_home_is_one_line(files, tmp_path, capsys, monkeypatch, home):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "hrnet_w18_small.ms_in1k.safetensors").write_bytes((files / "small.safetensors").read_bytes())
    monkeypatch.setenv("HRNET_MIRROR", str(mirror))
    monkeypatch.setenv("HRNET_HOME", str(files / home))
    monkeypatch.delenv("HRNET_OFFLINE", raising=False)
    code, err = cli(capsys, "predict", "hrnet-w18-small", str(files / "img.png"))
    assert_one_line(code, err, f"cannot write to the weights cache {files / home}", "set HRNET_HOME")


def deep_torch_zip(path: Path) -> Path:
    """A torch zip whose data.pkl nests 200,000 tuples: unpickling it overflows the C stack."""
    pkl = b"\x80\x02})" + b"\x85" * 200_000 + b"K\x01s."
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, data in [("archive/data.pkl", pkl), ("archive/byteorder", b"little"), ("archive/version", b"3\n")]:
            zf.writestr(name, data)
    return path


@pytest.mark.slow
def test_resume_from_a_deep_pickle_is_one_line_not_a_dead_interpreter(tmp_path):
    deep = deep_torch_zip(tmp_path / "step-00000005.pt")
    script = ("import sys; from hrnet.errors import HRNetError; from hrnet.training.state import load_state\n"
              "try:\n    load_state(__import__('pathlib').Path(sys.argv[1]))\n"
              "except HRNetError as e:\n    print(e, file=sys.stderr); sys.exit(1)\n")
    p = subprocess.run([sys.executable, "-c", script, str(deep)], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(SRC)))
    assert_one_line(p.returncode, "error: " + p.stderr, "step-00000005.pt", "nested more than 64 deep")


@pytest.mark.parametrize("make, fragment", [(lambda d: d / "afile" / "step-1.pt", "Not a directory"),
                                            (lambda d: d / "adir", "not a regular file")])
def test_resume_from_an_unreadable_path_is_a_resume_error(files, make, fragment):
    from hrnet.training.state import ResumeError, load_state

    with pytest.raises(ResumeError, match=fragment):
        load_state(make(files))


def test_a_fifo_as_model_checkpoint_is_refused_at_once(files):
    from hrnet.weights.errors import CheckpointError

    with pytest.raises(CheckpointError, match="not a regular file"):
        create_model("hrnet-w18-small", checkpoint=str(files / "fifo"))


def test_a_state_written_by_training_still_loads(tmp_path):
    from hrnet.training.state import REQUIRED, load_state, save_state

    model = create_model("hrnet-w18-small")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.zeros(2, 3, 32, 32)).sum().backward()
    opt.step()
    state = {k: 0 for k in REQUIRED} | {"model": model.state_dict(), "optimizer": opt.state_dict()}
    save_state(state, tmp_path / "step-00000001.pt")
    assert load_state(tmp_path / "step-00000001.pt")["optimizer"]["state"][0]["momentum_buffer"].shape == \
        next(model.parameters()).shape
