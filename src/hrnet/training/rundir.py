"""A training run's directory: one run at a time, a previous run never silently overwritten.

``claim_run_dir`` takes an exclusive ``flock`` on ``RUN_DIR/.lock`` for as long as the run lasts
(the kernel drops it when the process dies, even by SIGKILL, so a stale lock never blocks a
resume), and refuses a directory that already holds something unless the run resumes or was told
to start afresh.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import HRNetError
from ..fileio import exclusive_lock, open_regular

LOCK_NAME = ".lock"
# hrnet train's exit code after a SIGTERM/SIGUSR1 stop with a checkpoint written (EX_TEMPFAIL: run it again)
EXIT_PREEMPTED = 75
RUN_FILES = ("config.yaml", "log.jsonl", "checkpoints", "best.safetensors", "split.json")


class RunDirError(HRNetError):
    """A run directory that is in use, holds a previous run, or cannot be written."""


class RunLogError(HRNetError):
    """A run directory without a readable ``log.jsonl``."""


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn a failed write (read-only folder, full disk) into a one-line :class:`RunDirError`."""
    try:
        yield
    except OSError as e:
        raise RunDirError(f"{path}: cannot write ({e.strerror or e})") from None


def _is_run_file(name: str) -> bool:
    leftover = name.startswith(".") and ".part" in name and name[1:].startswith(RUN_FILES)  # atomic_write's temp
    return name in RUN_FILES or leftover


def remove_leftovers(run_dir: Path) -> list[str]:
    """Delete what interrupted atomic writes left in ``run_dir`` and its ``checkpoints`` folder (their
    ``.NAME.XXXX.part*`` temporary files: never a complete file, never read); returns their names.
    Called with the run directory locked, so no live writer owns them."""
    removed = []
    for folder in (run_dir, run_dir / "checkpoints"):
        if folder.is_dir() and not folder.is_symlink():
            for path in folder.iterdir():
                if path.name.startswith(".") and ".part" in path.name and path.is_file() and not path.is_symlink():
                    with writing(path):
                        path.unlink()
                    removed.append(path.name)
    return removed


@contextmanager
def claim_run_dir(run_dir: Path, *, resume: bool, force: bool = False) -> Iterator[None]:
    """Hold ``run_dir`` for one run. Without ``resume`` it must be empty, or with ``force`` hold only a
    previous run's files, which are then deleted. Either way the leftovers of an interrupted checkpoint
    write are removed first (:func:`remove_leftovers`)."""
    where = f"output.dir={run_dir}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise RunDirError(f"{where}: exists and is not a directory; choose another output.dir") from None
    except OSError as e:
        raise RunDirError(f"{where}: cannot write there ({e.strerror}); choose another output.dir") from None
    with exclusive_lock(run_dir / LOCK_NAME, where, holder="another training", instead="choose another output.dir",
                        error=RunDirError):
        remove_leftovers(run_dir)
        held = sorted(n for n in os.listdir(run_dir) if n != LOCK_NAME)
        if held and not resume:
            foreign = [n for n in held if not _is_run_file(n)]
            shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
            if foreign:
                raise RunDirError(f"{where}: is not empty and not a run directory (holds {shown}); choose "
                                  "another output.dir")
            if not force:
                raise RunDirError(f"{where}: holds a previous run ({shown}); pass --resume to continue it, "
                                  "--force to delete it and start afresh, or choose another output.dir")
            for name in held:
                path = run_dir / name
                with writing(path):
                    if path.is_dir() and not path.is_symlink():
                        shutil.rmtree(path)
                    else:
                        path.unlink()
        yield


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines log, each a mapping with an integer ``step``.

    A last line that does not parse and has no newline after it is what a crash in the middle of an
    append leaves: it is dropped. Any other bad line is a :class:`RunLogError` naming the line.
    """
    if not path.is_file():  # also refuses a FIFO, which would block the read forever
        raise RunLogError(f"{path}: no training log here (expected RUN_DIR/log.jsonl)")
    with open_regular(path, RunLogError) as f:
        text = f.read().decode("utf-8", errors="replace")
    lines = text.split("\n")
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):  # torn by a crash mid-append
                break
            raise RunLogError(f"{path}:{n}: not a JSON line") from None
        if not isinstance(record, dict) or type(record.get("step")) is not int:
            raise RunLogError(f"{path}:{n}: not a log record (a JSON object with an integer 'step')")
        records.append(record)
    return records
