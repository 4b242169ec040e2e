"""Batch prediction to a JSON-lines file that survives being killed, resumes, and shards under torchrun.

The file holds one ``hrnet predict --json`` record per line. Each record is written as one whole
line and flushed as soon as its batch is classified, so a killed run loses nothing it finished; at
most the last line is torn, and a resumed run drops it and carries on. One process streams straight
into the output. Under torchrun, rank ``r`` of ``N`` classifies items ``r, r + N, ...`` of the files
not yet done (no padding, as ``evaluate``) into its own part ``OUTPUT.rank-0000r-of-0000N``; at the
end rank 0 merges the output and every part into the output (atomically, in input order, each file
once) and removes the parts. Every rank must see the same input files and the output's directory
(across machines: a shared file system).

Memory: the file list, and on resume the set of names already done (every rank reads it); rank 0's
merge adds a name -> position index and two integer arrays. Records are streamed, never all held.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import itertools
import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from torch import nn

from ..distributed import all_gather_objects, barrier, init_distributed, wait_for_ranks
from ..errors import HRNetError, UsageError
from ..fileio import LockedError, atomic_write, display_path, exclusive_lock
from ..deploy.engine import Classifier, PathLike, check_topk
from .predict import expand_inputs

MAX_LINE = 16 << 20  # bytes; a 21k-class model's full ranking is ~1.5 MB, anything longer is not ours


class OutputFileError(HRNetError):
    """An existing output (or part) file that does not hold prediction records."""


def lock_path(output: PathLike) -> Path:
    """The lock file beside ``output`` that one run at a time holds (``.OUT.lock``)."""
    output = Path(output)
    return output.with_name(f".{output.name}.lock")


def _holds(lock: Path) -> bool:
    """Whether ``lock`` (just locked) is still the file at its path, with this process's pid in it."""
    try:
        return lock.read_text().strip() == str(os.getpid())
    except FileNotFoundError:
        return False


def part_path(output: PathLike, rank: int, world_size: int) -> Path:
    """Where rank ``rank`` of ``world_size`` streams its records before they are merged."""
    return Path(f"{os.fspath(output)}.rank-{rank:05d}-of-{world_size:05d}")


def existing_parts(output: PathLike) -> list[Path]:
    """Part files of ``output`` left by any run, of any world size, sorted by name."""
    return sorted(Path(p) for p in glob.glob(glob.escape(os.fspath(output)) + ".rank-*-of-*"))


def read_records(path: Path) -> Iterable[tuple[int, str]]:
    """``(byte offset, file name)`` of each complete record line of ``path``; a last line without its
    newline (torn by a crash) is skipped. Any other line that is not a record raises."""
    with open(path, "rb") as f:
        offset, number = 0, 0
        while line := f.readline(MAX_LINE + 1):
            number += 1
            if not line.endswith(b"\n"):
                if len(line) > MAX_LINE:
                    raise OutputFileError(f"{path}: line {number} is longer than {MAX_LINE} bytes")
                return  # torn last line
            try:
                name = json.loads(line)["file"]
            except (ValueError, TypeError, KeyError):
                name = None
            if not isinstance(name, str):
                raise OutputFileError(f"{path}: line {number} is not a prediction record; "
                                      "is this the right file?")
            yield offset, name
            offset += len(line)


def drop_torn_line(path: Path) -> None:
    """Cut a crash's incomplete last line, so that lines appended next start on their own line."""
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if not size:
            return
        f.seek(max(0, size - MAX_LINE - 1))
        tail = f.read()
        if tail.endswith(b"\n"):
            return
        cut = tail.rfind(b"\n")
        f.truncate(size - len(tail) + cut + 1)  # cut = -1: the only line is torn, nothing is kept


def _sources(output: Path) -> list[Path]:
    return [p for p in [output, *existing_parts(output)] if p.is_file() and p.stat().st_size]


def _digest(names: list[str]) -> str:
    h = hashlib.sha256()
    for n in names:
        h.update(n.encode("utf-8", "surrogateescape") + b"\0")
    return h.hexdigest()


def merge(output: Path, sources: list[Path], names: list[str]) -> int:
    """Write ``output`` (atomically) with one record per name, in the order of ``names``, taken from
    ``sources`` (first occurrence wins), followed by records of files that are not in ``names`` (a
    resumed run with other inputs keeps them). Reads the records twice, never holds them all.
    Returns the number of those extra records; raises if a name has no record."""
    where = {n: i for i, n in enumerate(names)}
    src = np.full(len(names), -1, dtype=np.int32)
    off = np.zeros(len(names), dtype=np.int64)
    extra: dict[str, tuple[int, int]] = {}
    for s, path in enumerate(sources):
        for offset, name in read_records(path):
            i = where.get(name)
            if i is None:
                extra.setdefault(name, (s, offset))
            elif src[i] < 0:
                src[i], off[i] = s, offset
    del where
    if (src < 0).any():
        first = names[int(np.argmax(src < 0))]
        raise OutputFileError(f"{output}: {int((src < 0).sum())} files have no record (first: {first}); "
                              "run again with --resume")

    def write(tmp: str) -> None:
        handles = [open(p, "rb") for p in sources]
        try:
            with open(tmp, "wb") as out:
                chunks = (zip(src[a:a + 65536].tolist(), off[a:a + 65536].tolist())
                          for a in range(0, len(names), 65536))
                for s, offset in itertools.chain(itertools.chain.from_iterable(chunks), extra.values()):
                    f = handles[s]
                    f.seek(offset)
                    out.write(f.readline(MAX_LINE + 1))
        finally:
            for f in handles:
                f.close()

    atomic_write(output, write)
    return len(extra)


def predict_to_file(model_or_name: nn.Module | str, inputs: PathLike | Iterable[PathLike], output: PathLike, *,
                    resume: bool = False, topk: int = 5, checkpoint: PathLike | None = None,
                    batch_size: int = 16, workers: int | None = None, device: str | None = None,
                    input_size: int | None = None, crop_pct: float | None = None, strict: bool = False,
                    progress: bool = False, backend: str | None = None, precision: str | None = None,
                    threads: int | None = None, compile_mode: str | None = None) -> dict:
    """Classify ``inputs`` like :func:`~hrnet.inference.predict.predict` (the same model options), streaming
    the records to the JSON-lines file ``output`` as they come, in one process or sharded across a
    torchrun job.

    One run at a time: the job holds an exclusive lock on ``.OUTPUT.lock`` beside the output, taken before
    anything already there is read; a second run is refused in one line naming the process holding it.
    An existing non-empty ``output`` (or parts of an interrupted torchrun run) is refused unless
    ``resume``, which skips every file that already has a record, error records included, and may
    use another number of processes than the interrupted run. When the run ends the output holds one
    record per input in input order (plus records of earlier runs' files that are not among
    ``inputs``, after them). Returns ``{"output", "files", "done", "skipped", "errors"}``: records
    written by this run, files skipped as already done, error records among those written.
    """
    check_topk(topk)
    output = Path(output)
    info = init_distributed(device)
    with contextlib.ExitStack() as held:
        refused = None
        if info.is_main:  # one lock for the job: rank 0 holds it for every rank
            lock = lock_path(output)
            try:
                output.parent.mkdir(parents=True, exist_ok=True)
                held.enter_context(exclusive_lock(lock, str(output), holder="another hrnet predict --output",
                                                  instead="choose another --output"))
                if not _holds(lock):  # we locked the file of a run that had just ended and removed it
                    raise LockedError(f"{output}: another hrnet predict --output started on it at this "
                                      "instant; wait for it to end or choose another --output")
                held.callback(lock.unlink, missing_ok=True)  # removed while still held, only by its holder
            except LockedError as e:
                refused = str(e)
        if refused := next(filter(None, all_gather_objects(refused)), None):
            raise LockedError(refused)
        build = dict(checkpoint=checkpoint, device=info.device, input_size=input_size, crop_pct=crop_pct,
                     backend=backend, precision=precision, threads=threads, progress=progress and info.is_main,
                     compile_mode=compile_mode)
        return _predict_locked(model_or_name, build, inputs, output, info, resume=resume, topk=topk,
                               batch_size=batch_size, workers=workers, strict=strict,
                               progress=progress and info.is_main)


def _predict_locked(model_or_name, build: dict, inputs, output: Path, info, *, resume: bool, topk: int,
                    batch_size: int, workers: int | None, strict: bool, progress: bool) -> dict:
    """:func:`predict_to_file` once the lock is held: ``build`` are :meth:`Classifier.build`'s options."""
    files, missing = expand_inputs(inputs, strict)
    errors = {m["file"]: m["error"] for m in missing}
    names = files + list(errors)
    if len(set(all_gather_objects(_digest(names)))) > 1:
        raise UsageError("the processes of this torchrun job see different input files; every machine "
                         "must see the same files under the same paths")
    sources = _sources(output)
    if sources and not resume:
        what = "already exists" if sources[0] == output else f"has parts of an interrupted run ({sources[0].name}...)"
        raise UsageError(f"{output} {what}; pass --resume to continue it, or choose another --output")
    barrier()  # every rank has looked before anything is changed
    if info.is_main:
        for path in sources:
            drop_torn_line(path)
        for path in glob.glob(glob.escape(os.fspath(output)) + ".done-*-of-*"):  # a killed run's
            os.unlink(path)
    barrier()
    done = {name for path in sources for _, name in read_records(path)}
    todo = np.flatnonzero(np.fromiter((n not in done for n in names), dtype=bool, count=len(names)))
    skipped = len(names) - len(todo)
    del done
    barrier()  # every rank has read the records before any rank appends to them
    mine: list[int] = todo[info.rank::info.world_size].tolist()
    del todo

    written = failed = 0
    target = part_path(output, info.rank, info.world_size) if info.distributed else output
    if mine:
        clf = Classifier.build(model_or_name, **build)
        with open(target, "a", encoding="utf-8") as out:

            def emit(record: dict) -> None:
                out.write(json.dumps(record) + "\n")  # one whole line, then flushed: a kill tears at most one
                out.flush()

            images = [i for i in mine if i < len(files)]
            for _, record in clf.predictions([files[i] for i in images], topk=topk, batch_size=batch_size,
                                             workers=workers, strict=strict, progress=progress):
                emit(record)
                failed += "error" in record
                written += 1
            for i in mine[len(images):]:  # inputs that matched nothing, after the images as in predict()
                emit({"file": names[i], "error": errors[names[i]]})
                failed += 1
                written += 1
            os.fsync(out.fileno())
    summary = {"output": os.fspath(output), "files": len(names), "done": written, "skipped": skipped,
               "errors": failed}
    if info.distributed:
        summary = _finish_rank(output, info.rank, info.world_size, summary)
    if info.is_main and (info.distributed or resume):
        sources = _sources(output)
        if sources != [output] or skipped:  # a fresh single-process output is already in order
            merge(output, sources, names)
        for path in existing_parts(output):
            path.unlink()
    return summary


def _finish_rank(output: Path, rank: int, world_size: int, summary: dict) -> dict:
    """Say this rank's part is complete with a marker file; rank 0 waits for every marker and returns the
    job's totals. Files rather than a collective, which would time out when one machine finishes its
    share later than the others; the wait still ends, in one line naming the rank, when a rank that
    has not finished stops beating (:func:`~hrnet.distributed.wait_for_ranks`). Its part keeps every
    record it finished, for ``--resume``."""
    def marker(r: int) -> Path:
        return Path(f"{os.fspath(output)}.done-{r:05d}-of-{world_size:05d}")

    atomic_write(marker(rank), lambda tmp: Path(tmp).write_text(json.dumps(summary)))
    if rank:
        return summary
    totals = dict(summary, done=0, errors=0)
    wait_for_ranks(lambda: [r for r in range(world_size) if not marker(r).exists()],
                   f"{display_path(output)}: waiting for the other ranks' records")
    for r in range(world_size):
        part = json.loads(marker(r).read_text())
        totals["done"] += part["done"]
        totals["errors"] += part["errors"]
    for r in range(world_size):
        marker(r).unlink()
    return totals
