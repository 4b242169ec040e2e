"""Hostile and broken weights files and download servers: refused in bounded time and memory, never cached.

Every file here is built byte by byte to break a naive loader (the shapes of the attacks are those
of issue 10); crashes and memory bombs run in a subprocess, bombs under an address-space limit, so
a regression fails the test instead of taking the machine down. Servers are local and bounded.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pickle
import signal
import stat
import struct
import subprocess
import sys
import textwrap
import threading
import time
import warnings
import zipfile
import zlib
from pathlib import Path

import pytest
import timm
import torch

from helpers import randomize
from hrnet.cli import main
from hrnet import create_model
from hrnet.weights import CheckpointError, DownloadError, download, load_checkpoint, load_weights, save_checkpoint
from hrnet.weights.containers import read_file

SMALL = "hrnet-w18-small"
DEEP = b"})" + b"\x85" * 200_000 + b"K\x01s."  # {((((...(),),)...): 1}: hashing the key overflows the C stack
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


# --- building hostile files -------------------------------------------------------------------------

pytestmark = pytest.mark.usefixtures("home")


class _Storage:
    def __init__(self, key: str, numel: int, kind: type = torch.FloatStorage):
        self.key, self.numel, self.kind = key, numel, kind


class _Tensor:
    """Pickles as torch.save pickles a tensor: _rebuild_tensor_v2(storage, offset, shape, stride, ...)."""

    def __init__(self, storage: _Storage, shape: tuple[int, ...], stride: tuple[int, ...]):
        self.args = (storage, 0, shape, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.args


def torch_pickle(obj, legacy: bool = False) -> bytes:
    """``obj`` pickled the way torch.save does, its _Storage objects as persistent ids."""
    import io

    buf = io.BytesIO()
    pickler = pickle.Pickler(buf, protocol=2)
    pickler.persistent_id = lambda o: (("storage", o.kind, o.key, "cpu", o.numel) + ((None,) if legacy else ())
                                       if isinstance(o, _Storage) else None)
    pickler.dump(obj)
    return buf.getvalue()


def write_zip(path: Path, entries: list[tuple[str, bytes, int, int, int]]) -> Path:
    """A zip written by hand: (name, payload, method, crc32, uncompressed size) per entry, so that an
    entry may declare any size for its (deflated) payload."""
    out, central = bytearray(), bytearray()
    for name, payload, method, crc, size in entries:
        raw = name.encode()
        central += struct.pack("<4s4B4HL2L5H2L", b"PK\x01\x02", 20, 3, 20, 0, 0, method, 0, 33, crc,
                               len(payload), size, len(raw), 0, 0, 0, 0, 0, len(out)) + raw
        out += struct.pack("<4s2B4HL2L2H", b"PK\x03\x04", 20, 0, 0, method, 0, 33, crc, len(payload), size,
                           len(raw), 0) + raw + payload
    out += central + struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(entries), len(entries), len(central),
                                 len(out), 0)
    path.write_bytes(bytes(out))
    return path


def torch_zip(path: Path, pkl: bytes, storages: dict[str, bytes] | None = None) -> Path:
    stored = lambda name, data: (name, data, zipfile.ZIP_STORED, zlib.crc32(data), len(data))  # noqa: E731
    return write_zip(path, [stored("archive/data.pkl", pkl), stored("archive/byteorder", b"little"),
                            *(stored(f"archive/data/{k}", v) for k, v in (storages or {}).items()),
                            stored("archive/version", b"3\n")])


def zip_bomb(path: Path, numel: int) -> Path:
    """A torch file of one float32 tensor of ``numel`` zeros, deflated: ~1 KB on disk per MB declared."""
    chunk = 64 << 20
    co = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = co.compress(bytes(chunk)) + co.flush(zlib.Z_FULL_FLUSH)  # byte-aligned, no back-references out
    size = numel * 4
    crc = 0
    for _ in range(size // chunk):
        crc = zlib.crc32(bytes(chunk), crc)
    pkl = torch_pickle({"w": _Tensor(_Storage("0", numel), (numel,), (1,))})
    return write_zip(path, [("archive/data.pkl", pkl, 0, zlib.crc32(pkl), len(pkl)),
                            ("archive/data/0", block * (size // chunk) + b"\x03\x00", zipfile.ZIP_DEFLATED, crc, size),
                            ("archive/version", b"3\n", 0, zlib.crc32(b"3\n"), 2)])


def legacy_torch(path: Path, main_pickle: bytes, keys: list[str], data: bytes = b"") -> Path:
    """A pre-zip torch file: magic, protocol, sys info, the object, the storage keys, then raw storages."""
    head = b"".join(pickle.dumps(x, protocol=2) for x in
                    (LEGACY_MAGIC, 1001, {"protocol_version": 1001, "little_endian": True,
                                          "type_sizes": {"short": 2, "int": 4, "long": 4}}))
    path.write_bytes(head + main_pickle + pickle.dumps(keys, protocol=2) + data)
    return path


def run_python(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


# --- 1. pickle bombs --------------------------------------------------------------------------------

@pytest.mark.slow
def test_deeply_nested_pickles_are_refused_before_unpickling(tmp_path, capsys):
    # Today's loader dies with SIGSEGV (exit -11) on each: run them in a child process.
    (tmp_path / "deep.pdparams").write_bytes(b"\x80\x04" + DEEP)
    torch_zip(tmp_path / "deep.pth", b"\x80\x02" + DEEP)
    legacy_torch(tmp_path / "deep_legacy.pth", b"\x80\x02" + DEEP, [])
    proc = run_python(f"""
        from hrnet.weights.containers import read_file
        for name in ("deep.pdparams", "deep.pth", "deep_legacy.pth"):
            try:
                read_file({str(tmp_path)!r} + "/" + name)
            except Exception as e:
                print(type(e).__name__, e)
        """)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 3
    for line, name in zip(lines, ("deep.pdparams", "deep.pth (data.pkl)", "deep_legacy.pth")):
        assert line.startswith(f"CheckpointError {tmp_path / name}: refused before unpickling: containers nested "
                               "more than 64 deep"), line
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "deep.pdparams"), str(tmp_path / "o.safetensors")]) == 1
    err = capsys.readouterr().err  # safe in this process now that the child survived
    assert err.startswith("hrnet: error: ") and err.count("\n") == 1 and "nested more than 64 deep" in err


# --- 2. memory bombs --------------------------------------------------------------------------------

@pytest.mark.slow
def test_memory_bombs_are_refused_under_a_memory_limit(tmp_path):
    numel = 1 << 28  # a 1 GiB float32 tensor declared by each file below; hrnet-w64's largest holds 2.4 M
    bomb = zip_bomb(tmp_path / "bomb.pth", numel)
    assert bomb.stat().st_size < 2 << 20
    one = _Storage("0", 1)
    torch_zip(tmp_path / "stride0.pth", torch_pickle({"w": _Tensor(one, (numel,), (0,))}),
              {"0": bytes(4)})  # a valid view of one float, repeated 2^28 times
    legacy_torch(tmp_path / "legacy.pth", torch_pickle({"w": _Tensor(_Storage("0", numel), (numel,), (1,))},
                                                        legacy=True), ["0"], struct.pack("<q", numel))
    header = json.dumps({"w": {"dtype": "F32", "shape": [numel], "data_offsets": [0, 4 * numel]}}).encode()
    (tmp_path / "big_header.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(64))
    (tmp_path / "huge_header.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{" + bytes(64))
    names = ["bomb.pth", "stride0.pth", "legacy.pth", "big_header.safetensors", "huge_header.safetensors"]
    proc = run_python(f"""
        import resource, time
        import torch
        from hrnet.weights import load_checkpoint
        def status(key):
            return next(int(l.split()[1]) << 10 for l in open("/proc/self/status") if l.startswith(key))
        base = status("VmSize:")
        resource.setrlimit(resource.RLIMIT_AS, (base + (1 << 30), resource.RLIM_INFINITY))
        rss = status("VmRSS:")
        for name in {names!r}:
            start = time.monotonic()
            try:
                load_checkpoint({str(tmp_path)!r} + "/" + name)
            except Exception as e:
                print(type(e).__name__, round(time.monotonic() - start, 1), e)
        print("peak", status("VmHWM:") - rss)
        """)
    assert proc.returncode == 0, proc.stderr[-2000:]
    *lines, peak = proc.stdout.splitlines()
    assert len(lines) == len(names), proc.stdout
    for line, name in zip(lines, names):
        kind, seconds, message = line.split(" ", 2)
        assert kind == "CheckpointError" and float(seconds) < 5 and message.startswith(str(tmp_path / name)), line
    assert "inflate to" in lines[0] and "more than they take on disk" in lines[0]
    assert "declares a tensor of shape [268435456]" in lines[1]
    assert "declares 1,073,741,824 bytes of storages but only 8 bytes follow" in lines[2]
    assert "tensor 'w' has 268,435,456 elements" in lines[3]
    assert "header length 1099511627776" in lines[4]
    assert int(peak.split()[1]) < 512 << 20


# --- 3. a timm training checkpoint --------------------------------------------------------------------

@pytest.mark.slow
def test_timm_training_checkpoint_with_argparse_namespace_loads_its_state_dict(tmp_path):
    reference = randomize(timm.create_model("hrnet_w18_small"))
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    reference(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()  # a real momentum state in the checkpoint
    reference.eval()
    args = argparse.Namespace(model="hrnet_w18_small", lr=0.1, epochs=100, aa=None, mean=[0.485, 0.456, 0.406])
    for legacy in (False, True):
        path = tmp_path / f"checkpoint-{int(legacy)}.pth.tar"  # timm's train.py layout
        torch.save({"epoch": 3, "arch": "hrnet_w18_small", "state_dict": reference.state_dict(),
                    "optimizer": optimizer.state_dict(), "version": 2, "args": args, "metric": 12.5},
                   path, _use_new_zipfile_serialization=not legacy)
        model = create_model(SMALL)
        load_weights(model, path)
        x = torch.randn(1, 3, 64, 64)
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(x), reference(x), rtol=1e-5, atol=1e-5)

    class Evil:  # anything but the Namespace stays refused
        def __reduce__(self):
            return os.system, ("touch " + str(tmp_path / "pwned"),)
    torch.save({"state_dict": reference.state_dict(), "args": Evil()}, tmp_path / "evil.pth.tar")
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        load_checkpoint(tmp_path / "evil.pth.tar")
    assert not (tmp_path / "pwned").exists()


# --- 4. weights that would give silently wrong results ------------------------------------------------

@pytest.mark.slow
def test_nan_negative_variance_and_integer_weights_are_refused_by_name(tmp_path):
    model = create_model(SMALL).eval()
    cases = {
        "nan": ("conv1.weight", lambda t: t.view(-1)[7].fill_(float("nan")), "conv1.weight holds NaN or Inf"),
        "inf": ("classifier.bias", lambda t: t.view(-1)[0].fill_(float("-inf")), "classifier.bias holds NaN or Inf"),
        "var": ("bn1.running_var", lambda t: t.view(-1)[3].fill_(-0.5), "bn1.running_var holds a negative variance"),
    }
    for label, (key, corrupt, message) in cases.items():
        broken = create_model(SMALL).eval()
        broken.load_state_dict(model.state_dict())
        with torch.no_grad():
            corrupt(broken.state_dict()[key])
        path = save_checkpoint(broken, tmp_path / f"{label}.safetensors")
        with pytest.raises(CheckpointError, match=f"{path}: refused: {message}"):
            load_weights(create_model(SMALL), path)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["conv1.weight"] = sd["conv1.weight"].round().to(torch.int32)
    sd["bn1.weight"] = sd["bn1.weight"] > 0
    torch.save(sd, tmp_path / "ints.pth")
    with pytest.raises(CheckpointError, match="conv1.weight is int32, not floating point; bn1.weight is bool"):
        load_checkpoint(tmp_path / "ints.pth")


# --- 5. downloads: only verified files are cached, bounded in size and time -----------------------------

@pytest.fixture(scope="module")
def small_weights(tmp_path_factory) -> bytes:
    return save_checkpoint(create_model(SMALL), tmp_path_factory.mktemp("w") / "w.safetensors").read_bytes()


def _no_length(body: bytes):
    def handler(h):  # HTTP/1.0 style: no Content-Length, the body ends when the connection closes
        h.send_response(200)
        h.end_headers()
        h.wfile.write(body)
    return handler


@pytest.mark.slow
def test_truncated_body_without_length_caches_nothing_and_unhashed_files_warn(server, home, small_weights, tmp_path):
    torch.save(create_model(SMALL).state_dict(), tmp_path / "w.pth")
    pth = (tmp_path / "w.pth").read_bytes()
    for name, data in (("w.safetensors", small_weights), ("w.pth", pth)):
        server.handlers[f"/half/{name}"] = _no_length(data[: len(data) // 2])
        with pytest.raises(DownloadError, match=f"/half/{name}: not a complete checkpoint .*nothing was cached"):
            download.fetch(f"{server.url}/half/{name}", progress=False)
        assert not download.cache_path(f"{server.url}/half/{name}").exists() and not list(home.rglob("*.part*"))
        server.handlers[f"/full/{name}"] = _no_length(data)
        with pytest.warns(UserWarning, match=f"{name}: no published checksum; verified only by length and structure"):
            assert download.fetch(f"{server.url}/full/{name}", progress=False).read_bytes() == data


def test_oversized_and_endless_bodies_are_cut_and_refused(server, home, monkeypatch):
    monkeypatch.setattr(download, "MAX_BYTES", 1 << 20)

    def huge_length(h):
        h.send_response(200)
        h.send_header("Content-Length", str(1 << 40))
        h.end_headers()

    def endless(h):  # bounded here so the test server stops on its own; far past the client's cap
        h.send_response(200)
        h.end_headers()
        for _ in range(64):
            h.wfile.write(bytes(64 << 10))
    server.handlers["/huge.pth"], server.handlers["/endless.pth"] = huge_length, endless
    with pytest.raises(DownloadError, match="1,099,511,627,776 bytes, more than the 1,048,576"):
        download.fetch(f"{server.url}/huge.pth", progress=False)
    with pytest.raises(DownloadError, match="sent more than 1,048,576 bytes .the maximum.; nothing was cached"):
        download.fetch(f"{server.url}/endless.pth", progress=False)
    assert not home.exists() or not any(home.iterdir())


@pytest.mark.slow
def test_trickling_server_fails_within_the_stall_window(server, home, monkeypatch):
    monkeypatch.setattr(download, "STALL_WINDOW", 1.0)
    monkeypatch.setattr(download, "MIN_RATE", 1024)
    stop = threading.Event()

    def trickle(h):  # one byte every 0.3 s; each read returns before the per-read timeout
        h.send_response(200)
        h.send_header("Content-Length", "1000")
        h.end_headers()
        for _ in range(100):
            if stop.is_set():
                return
            h.wfile.write(b"\0")
            h.wfile.flush()
            time.sleep(0.3)
    server.handlers["/slow.pth"] = trickle
    start = time.monotonic()
    try:
        with pytest.raises(DownloadError, match=r"stalled \(\d+ bytes in the last 1 s, under 1024 bytes/s\)"):
            download.fetch(f"{server.url}/slow.pth", progress=False)
    finally:
        stop.set()
    assert time.monotonic() - start < 5
    assert not home.exists() or not any(home.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_download_leaves_no_part_file(server, home, signum):
    stop = threading.Event()

    def stalls(h):
        h.send_response(200)
        h.send_header("Content-Length", str(10 << 20))
        h.end_headers()
        h.wfile.write(bytes(1 << 20))
        h.wfile.flush()
        stop.wait(30)
    server.handlers["/w.pth"] = stalls
    child = subprocess.Popen([sys.executable, "-c", "import sys; from hrnet.weights import download; "
                              "download.fetch(sys.argv[1], progress=False)", f"{server.url}/w.pth"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not list(home.rglob("*.part*")) and time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.05)
        assert list(home.rglob("*.part*")), "the download never started"
        time.sleep(0.2)  # inside the read loop
        child.send_signal(signum)
        child.wait(timeout=20)
    finally:
        stop.set()
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signum
    assert list(home.iterdir()) == []


def test_info_says_which_models_have_no_published_checksum(capsys):
    assert main(["info", "hrnet-w18-small", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["download_check"] == download.UNVERIFIED
    assert main(["info", "hrnet-w18"]) == 0
    assert "download_check: SHA-256 prefix 0c10b180" in capsys.readouterr().out


# --- 6. FIFOs and other non-regular files -------------------------------------------------------------

def _within(seconds: float, fn) -> BaseException | None:
    """Run ``fn`` in a daemon thread; fail if it has not returned in time (a blocked open never returns)."""
    result: list[BaseException | None] = []

    def target():
        try:
            fn()
            result.append(None)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            result.append(e)
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert result, f"still blocked after {seconds} s"
    return result[0]


def test_fifo_checkpoint_or_mirror_file_is_refused_at_once(tmp_path, monkeypatch):
    os.mkfifo(tmp_path / "w.pth")
    error = _within(5, lambda: read_file(tmp_path / "w.pth"))
    assert isinstance(error, CheckpointError) and "not a regular file" in str(error)
    monkeypatch.setenv("HRNET_MIRROR", str(tmp_path))
    error = _within(5, lambda: download.fetch("https://example.invalid/w.pth", progress=False))
    assert isinstance(error, DownloadError) and f"mirror {tmp_path / 'w.pth'}" in str(error)
    assert "not a regular file" in str(error)


# --- 7. the cache directory: permissions and unwritable homes -----------------------------------------

def test_cache_respects_umask_and_unwritable_home_is_one_line(server, home, small_weights, monkeypatch):
    server.files["/w.safetensors"] = small_weights
    old = os.umask(0o022)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            path = download.fetch(f"{server.url}/w.safetensors", progress=False)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    monkeypatch.setenv("HRNET_HOME", "/proc/self/hrnet-home")  # not writable, even by root
    with pytest.raises(DownloadError, match=r"^cannot write to the weights cache /proc/self/hrnet-home \(.*\); set "
                                            r"HRNET_HOME to a writable directory with free space$"):
        download.fetch(f"{server.url}/w.safetensors", progress=False)


@pytest.mark.slow
def test_full_disk_during_download_is_one_line_and_caches_nothing(server, home, small_weights):
    # RLIMIT_FSIZE makes writes fail like a full disk (EFBIG), in a child so the test process is untouched.
    server.files["/w.safetensors"] = small_weights
    proc = run_python(f"""
        import resource, signal, os
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        os.environ["HRNET_HOME"] = {str(home.parent)!r}
        from hrnet.weights import download, DownloadError
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))
        try:
            download.fetch({server.url!r} + "/w.safetensors", progress=False)
        except DownloadError as e:
            print(e)
        """)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"cannot write to the weights cache {home} (File too large)"), proc.stdout
    assert list(home.iterdir()) == []
