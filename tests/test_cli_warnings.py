"""No Python warning reaches a CLI user raw: hrnet's own are one line in its words, other packages'
are dropped, and HRNET_DEBUG=1 shows Python's own display."""

from __future__ import annotations

import warnings

import pytest
import torch

from hrnet import cli
from hrnet.weights import download


def _warner(text: str, origin: str):
    """A function that warns ``text`` from a line of the file ``origin``, with that module's own registry
    (so "once per place" behaves as it does for a real module)."""
    code = compile(f"import warnings\nwarnings.warn({text!r}, UserWarning)\n", origin, "exec")
    scope: dict = {}
    return lambda: exec(code, scope)


# As torch's lr_scheduler and DataLoader raise them, and as hrnet's download module does.
_warn_from_torch = _warner("Detected call of `lr_scheduler.step()` before `optimizer.step()`",
                           torch.optim.lr_scheduler.__file__)
_warn_from_hrnet = _warner("w.pth: no published checksum\nsecond line", download.__file__)


def test_our_warning_is_one_line_and_theirs_is_dropped(capfd, monkeypatch):
    monkeypatch.delenv("HRNET_DEBUG", raising=False)
    with cli.warnings_in_our_words():
        _warn_from_torch()
        _warn_from_hrnet()
        _warn_from_hrnet()  # the same warning from the same place: once
    err = capfd.readouterr().err
    assert err == "hrnet: warning: w.pth: no published checksum\n"
    assert "Warning" not in err and "warnings.warn" not in err


def test_debug_keeps_pythons_display(recwarn, monkeypatch):
    monkeypatch.setenv("HRNET_DEBUG", "1")
    warnings.simplefilter("always")
    with cli.warnings_in_our_words():
        _warn_from_torch()
    assert [str(w.message) for w in recwarn] == ["Detected call of `lr_scheduler.step()` before `optimizer.step()`"]


def test_main_runs_the_command_inside_the_filter(capfd, monkeypatch):
    monkeypatch.delenv("HRNET_DEBUG", raising=False)
    parser = cli.build_parser()
    args = parser.parse_args(["list"])
    monkeypatch.setattr(cli, "parse_args", lambda p, argv: args)
    monkeypatch.setattr(args, "func", lambda a: (_warn_from_torch(), _warn_from_hrnet(), 0)[-1])
    assert cli.main([]) == 0
    assert capfd.readouterr().err == "hrnet: warning: w.pth: no published checksum\n"


@pytest.mark.parametrize("noise", ["torch", "hrnet"])
def test_outside_a_command_warnings_are_pythons(noise, recwarn):
    (_warn_from_torch if noise == "torch" else _warn_from_hrnet)()
    assert len(recwarn) == 1  # the library API keeps Python's warnings for its callers
