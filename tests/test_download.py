"""Downloads against a local HTTP server started here: hash check, cache reuse, atomic writes, mirror, offline."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from hrnet import create_model
from hrnet.models import resolve
from hrnet.weights import ChecksumError, DownloadError, load_weights, save_checkpoint
from hrnet.weights import download

SMALL = "hrnet-w18-small"

pytestmark = pytest.mark.usefixtures("home")


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> tuple[bytes, str, torch.nn.Module]:
    """An hrnet-format W18-small file's bytes, its SHA-256, and the model it holds."""
    model = create_model(SMALL).eval()
    path = save_checkpoint(model, tmp_path_factory.mktemp("w") / "w.safetensors")
    data = path.read_bytes()
    return data, hashlib.sha256(data).hexdigest(), model


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


@pytest.mark.slow
def test_pretrained_downloads_verifies_and_reuses_the_cache(server, home, weights):
    data, sha, model = weights
    name = f"hrnet_w18_small-{sha[:8]}.safetensors"
    server.files[f"/v0/{name}"] = data
    record = dataclasses.replace(resolve(SMALL), url=f"{server.url}/v0/{name}", sha256_prefix=sha[:8])
    first = create_model(SMALL)
    load_weights(first, record)
    assert same_weights(first, model)
    entry = download.cache_path(record.url, name)
    assert entry.read_bytes() == data and [p.parent for p in home.glob("*/*")] == [entry.parent] * 2
    assert sorted(p.name for p in entry.parent.iterdir()) == sorted([name, download.RECORD])
    second = create_model(SMALL)
    load_weights(second, record)
    assert same_weights(second, model)
    assert server.requests == [f"/v0/{name}"]  # the second load never asked the server


@pytest.mark.slow
def test_checkpoint_url_is_cached_and_hash_checked(server, home, weights):
    data, sha, model = weights
    server.files[f"/x/w-{sha[:10]}.safetensors"] = data
    url = f"{server.url}/x/w-{sha[:10]}.safetensors"
    assert same_weights(create_model(SMALL, checkpoint=url), model)
    assert same_weights(create_model(SMALL, checkpoint=url), model)
    assert len(server.requests) == 1 and download.cache_path(url).is_file()


@pytest.mark.slow
def test_concurrent_fetches_download_once(server, home, weights):
    # torchrun ranks that all ask for pretrained weights: one downloads, the others wait for it.
    data, sha, _ = weights
    name = f"w-{sha[:8]}.safetensors"
    server.files[f"/c/{name}"] = data
    server.delay = 0.5
    paths: list[Path] = []
    threads = [threading.Thread(target=lambda: paths.append(download.fetch(f"{server.url}/c/{name}", progress=False)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert server.requests == [f"/c/{name}"]
    entry = download.cache_path(f"{server.url}/c/{name}")
    assert paths == [entry] * 3 and entry.read_bytes() == data


def test_hash_mismatch_is_rejected_and_nothing_cached(server, home, weights):
    data, sha, _ = weights
    wrong = "0" * 8 if not sha.startswith("0" * 8) else "1" * 8
    server.files[f"/w-{wrong}.safetensors"] = data
    with pytest.raises(ChecksumError, match=f"SHA-256 {sha[:8]} does not match the {wrong}"):
        create_model(SMALL, checkpoint=f"{server.url}/w-{wrong}.safetensors")
    assert not home.exists() or not any(home.iterdir())


@pytest.mark.slow
def test_connection_dropped_mid_file_caches_nothing(server, home, weights):
    data, _, model = weights
    server.files["/w.safetensors"] = data  # no hash in the name: only the length can tell
    with pytest.raises(DownloadError, match=f"connection closed after {len(data) // 2} of {len(data)} bytes"):
        create_model(SMALL, checkpoint=f"{server.url}/drop/w.safetensors")
    assert not home.exists() or not any(home.iterdir())
    assert same_weights(create_model(SMALL, checkpoint=f"{server.url}/w.safetensors"), model)  # a retry works


@pytest.mark.slow
def test_mirror_url_and_directory_serve_the_same_file_names(server, home, weights, tmp_path, monkeypatch):
    data, sha, model = weights
    name = f"hrnet_w18_small-{sha[:8]}.safetensors"
    record = dataclasses.replace(resolve(SMALL), url=f"http://unreachable.invalid/v0/{name}")
    server.files[f"/mirror/{name}"] = data
    monkeypatch.setenv("HRNET_MIRROR", f"{server.url}/mirror/")
    first = create_model(SMALL)
    load_weights(first, record)
    assert same_weights(first, model) and server.requests == [f"/mirror/{name}"]

    download.cache_path(record.url, name).unlink()
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / name).write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # a corrupt mirror copy
    monkeypatch.setenv("HRNET_MIRROR", str(mirror))
    with pytest.raises(ChecksumError, match=str(mirror / name)):
        load_weights(create_model(SMALL), record)
    (mirror / name).write_bytes(data)
    second = create_model(SMALL)
    load_weights(second, record)
    assert same_weights(second, model) and len(server.requests) == 1


@pytest.mark.slow
def test_offline_never_touches_the_network(server, home, weights, monkeypatch):
    data, sha, model = weights
    name = f"w-{sha[:8]}.safetensors"
    server.files[f"/{name}"] = data
    monkeypatch.setenv("HRNET_OFFLINE", "1")
    with pytest.raises(DownloadError) as e:
        create_model(SMALL, checkpoint=f"{server.url}/{name}")
    for part in (f"{server.url}/{name}", str(download.cache_path(f"{server.url}/{name}")), "checkpoint=", "--checkpoint"):
        assert part in str(e.value)
    assert server.requests == []
    monkeypatch.delenv("HRNET_OFFLINE")
    create_model(SMALL, checkpoint=f"{server.url}/{name}")
    monkeypatch.setenv("HRNET_OFFLINE", "1")  # once cached, offline works
    assert same_weights(create_model(SMALL, checkpoint=f"{server.url}/{name}"), model)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_host_fails_fast_naming_url_cache_and_local_file_option(home):
    url = f"http://127.0.0.1:{_closed_port()}/hrnet-w18-0c10b180.pth"
    start = time.monotonic()
    with pytest.raises(DownloadError) as e:
        create_model(SMALL, checkpoint=url)
    assert time.monotonic() - start < 5
    for part in (url, str(download.cache_path(url)), "checkpoint=", "--checkpoint"):
        assert part in str(e.value)


def test_silent_host_times_out(home, monkeypatch):
    """A host that accepts the connection but never answers (a black-holed proxy) hits the timeout."""
    monkeypatch.setattr(download, "TIMEOUT", 0.5)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/w.pth"
        start = time.monotonic()
        with pytest.raises(DownloadError, match="timed out"):
            create_model(SMALL, checkpoint=url)
        assert time.monotonic() - start < 5


def _other_weights(tmp_path: Path) -> bytes:
    torch.manual_seed(1)
    return save_checkpoint(create_model(SMALL), tmp_path / "other.safetensors").read_bytes()


@pytest.mark.slow
def test_one_file_name_at_two_urls_is_two_entries_each_checked_on_reuse(server, home, weights, tmp_path, capsys):
    # issue 22 §2: the cache was keyed by file name, so teamB got teamA's weights (this fails on that code)
    from hrnet.cli import main

    data_a, sha_a, _ = weights
    data_b = _other_weights(tmp_path)
    url_a, url_b = f"{server.url}/teamA/model.safetensors", f"{server.url}/teamB/model.safetensors"
    server.files["/teamA/model.safetensors"], server.files["/teamB/model.safetensors"] = data_a, data_b
    for url, sha in ((url_a, sha_a), (url_b, hashlib.sha256(data_b).hexdigest())):
        assert main(["convert", url, str(tmp_path / "out.safetensors"), "--json", "-q"]) == 0
        out, err = capsys.readouterr()
        assert json.loads(out)["source_sha256"] == sha
        assert err == "hrnet: warning: model.safetensors: no published checksum; verified only by length and structure\n"
    a, b = download.cache_path(url_a), download.cache_path(url_b)
    assert a != b and a.read_bytes() == data_a and b.read_bytes() == data_b
    assert json.loads((a.parent / download.RECORD).read_text()) == {"url": url_a, "size": len(data_a), "sha256": sha_a}
    assert download.fetch(url_a, progress=False) == a and len(server.requests) == 2  # a reuse asks nobody
    a.write_bytes(data_b)  # another user's bytes swapped in under teamA's entry
    with pytest.warns(UserWarning, match=f"{a}: the cached file is not what {url_a} served"):
        assert download.fetch(url_a, progress=False).read_bytes() == data_a
    assert server.requests.count("/teamA/model.safetensors") == 2


@pytest.mark.slow
def test_a_hash_named_entry_with_a_rewritten_record_is_still_verified(server, home, weights, tmp_path):
    data, sha, _ = weights
    url = f"{server.url}/h/w-{sha[:8]}.safetensors"
    server.files[f"/h/w-{sha[:8]}.safetensors"] = data
    path = download.fetch(url, progress=False)
    other = _other_weights(tmp_path)  # other bytes, and a record that agrees with them but not with the name
    path.write_bytes(other)
    (path.parent / download.RECORD).write_text(json.dumps(
        {"url": url, "size": len(other), "sha256": hashlib.sha256(other).hexdigest()}))
    with pytest.warns(UserWarning, match="not what"):
        assert download.fetch(url, progress=False).read_bytes() == data
    assert len(server.requests) == 2


@pytest.mark.slow
def test_two_processes_sharing_a_home_each_get_their_own_urls_bytes(server, home, weights, tmp_path):
    data_a, _, _ = weights
    data_b = _other_weights(tmp_path)
    server.files["/teamA/model.safetensors"], server.files["/teamB/model.safetensors"] = data_a, data_b
    server.delay = 1.0  # both downloads are in flight at once
    code = ("import hashlib, sys, warnings; warnings.simplefilter('ignore'); from hrnet.weights import download; "
            "print(hashlib.sha256(download.fetch(sys.argv[1], progress=False).read_bytes()).hexdigest())")
    children = [subprocess.Popen([sys.executable, "-c", code, f"{server.url}/{team}/model.safetensors"],
                                 stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
                for team in ("teamA", "teamB")]
    got = [c.communicate(timeout=120)[0].strip() for c in children]
    assert [c.returncode for c in children] == [0, 0]
    assert got == [hashlib.sha256(data_a).hexdigest(), hashlib.sha256(data_b).hexdigest()]
