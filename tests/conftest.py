"""Fixtures several test modules share (a module opts in with ``pytestmark = pytest.mark.usefixtures(...)``
or by naming the fixture)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import Server


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An empty weights cache of the test's own (``HRNET_HOME``), online, no mirror; its checkpoints folder."""
    monkeypatch.setenv("HRNET_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HRNET_OFFLINE", raising=False)
    monkeypatch.delenv("HRNET_MIRROR", raising=False)
    return tmp_path / "home" / "checkpoints"


@pytest.fixture
def server():
    """A local HTTP server on 127.0.0.1 (see :class:`helpers.Server`)."""
    s = Server()
    yield s
    s.close()


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared 2-core machine, OpenMP spinning makes tiny convolutions crawl."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
