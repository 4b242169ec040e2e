"""Downloads against a local HTTP server started here: hash check, cache reuse, atomic writes, mirror, offline."""

from __future__ import annotations

import dataclasses
import hashlib
import socket
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


def test_pretrained_downloads_verifies_and_reuses_the_cache(server, home, weights):
    data, sha, model = weights
    name = f"hrnet_w18_small-{sha[:8]}.safetensors"
    server.files[f"/v0/{name}"] = data
    record = dataclasses.replace(resolve(SMALL), url=f"{server.url}/v0/{name}", sha256_prefix=sha[:8])
    first = create_model(SMALL)
    load_weights(first, record)
    assert same_weights(first, model)
    assert (home / name).read_bytes() == data and sorted(p.name for p in home.iterdir()) == [name]
    second = create_model(SMALL)
    load_weights(second, record)
    assert same_weights(second, model)
    assert server.requests == [f"/v0/{name}"]  # the second load never asked the server


def test_checkpoint_url_is_cached_and_hash_checked(server, home, weights):
    data, sha, model = weights
    server.files[f"/x/w-{sha[:10]}.safetensors"] = data
    url = f"{server.url}/x/w-{sha[:10]}.safetensors"
    assert same_weights(create_model(SMALL, checkpoint=url), model)
    assert same_weights(create_model(SMALL, checkpoint=url), model)
    assert len(server.requests) == 1 and (home / f"w-{sha[:10]}.safetensors").is_file()


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
    assert paths == [home / name] * 3 and (home / name).read_bytes() == data


def test_hash_mismatch_is_rejected_and_nothing_cached(server, home, weights):
    data, sha, _ = weights
    wrong = "0" * 8 if not sha.startswith("0" * 8) else "1" * 8
    server.files[f"/w-{wrong}.safetensors"] = data
    with pytest.raises(ChecksumError, match=f"SHA-256 {sha[:8]} does not match the {wrong}"):
        create_model(SMALL, checkpoint=f"{server.url}/w-{wrong}.safetensors")
    assert not home.exists() or not any(home.iterdir())


def test_connection_dropped_mid_file_caches_nothing(server, home, weights):
    data, _, model = weights
    server.files["/w.safetensors"] = data  # no hash in the name: only the length can tell
    with pytest.raises(DownloadError, match=f"connection closed after {len(data) // 2} of {len(data)} bytes"):
        create_model(SMALL, checkpoint=f"{server.url}/drop/w.safetensors")
    assert not home.exists() or not any(home.iterdir())
    assert same_weights(create_model(SMALL, checkpoint=f"{server.url}/w.safetensors"), model)  # a retry works


def test_mirror_url_and_directory_serve_the_same_file_names(server, home, weights, tmp_path, monkeypatch):
    data, sha, model = weights
    name = f"hrnet_w18_small-{sha[:8]}.safetensors"
    record = dataclasses.replace(resolve(SMALL), url=f"http://unreachable.invalid/v0/{name}")
    server.files[f"/mirror/{name}"] = data
    monkeypatch.setenv("HRNET_MIRROR", f"{server.url}/mirror/")
    first = create_model(SMALL)
    load_weights(first, record)
    assert same_weights(first, model) and server.requests == [f"/mirror/{name}"]

    (home / name).unlink()
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


def test_offline_never_touches_the_network(server, home, weights, monkeypatch):
    data, sha, model = weights
    name = f"w-{sha[:8]}.safetensors"
    server.files[f"/{name}"] = data
    monkeypatch.setenv("HRNET_OFFLINE", "1")
    with pytest.raises(DownloadError) as e:
        create_model(SMALL, checkpoint=f"{server.url}/{name}")
    for part in (f"{server.url}/{name}", str(home / name), "checkpoint=", "--checkpoint"):
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
    for part in (url, str(home / "hrnet-w18-0c10b180.pth"), "checkpoint=", "--checkpoint"):
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
