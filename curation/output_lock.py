"""One run at a time per output directory.

A second run of a stage on an output that another is writing deleted the
first one's temp files under it (a rerun's cleanup of a killed run's
leftovers), so the first crashed; with `--overwrite` it deleted the whole
folder while the first went on writing, and the first still reported its
row count. A run holds an exclusive `flock` on `.<output>.lock`, beside the
output rather than in it (an overwrite deletes the output), for as long as
it runs; the kernel drops it when the process dies, so a killed run never
leaves the folder locked. Dagster already runs one build partition at a time;
this covers the command line and runs started by hand beside a schedule.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class OutputBusy(RuntimeError):
    """Another live run holds the output."""


def lock_path(output: str | Path) -> Path:
    output = Path(output).resolve()
    return output.parent / f".{output.name}.lock"


def _open(path: Path) -> int | None:
    """A descriptor on the lock file, read-write if this user may create or write it, else read-only (flock
    needs neither: another user's run may have made it); None if it cannot be opened at all."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:
        try:
            return os.open(path, os.O_RDONLY)
        except OSError:
            return None
    except OSError:
        return None


@contextmanager
def output_lock(output: str | Path | None, stage: str) -> Iterator[None]:
    """Hold the output for this run, or raise OutputBusy naming the run that holds it. No output (an error
    the stage raises itself), a lock file this user cannot open (a read-only parent folder) or a filesystem
    without locks (some network mounts) runs unlocked, with a warning."""
    if not output:
        yield
        return
    path = lock_path(output)
    descriptor = _open(path)
    locked = False
    if descriptor is not None:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            holder = os.pread(descriptor, 4096, 0).decode(errors="replace").strip() or "a live process"
            os.close(descriptor)
            raise OutputBusy(f"{stage}: {output} is being written by another run ({holder}); wait for it to end, "
                             f"or choose another --output") from None
        except OSError:
            pass
    if not locked:
        print(f"[{stage}] warning: {path} cannot be locked here; nothing stops a second run on {output}")
    try:
        if locked:
            _say_holder(descriptor, stage)
        yield
    finally:
        if descriptor is not None:
            os.close(descriptor)  # and with it the lock


def _say_holder(descriptor: int, stage: str) -> None:
    """Who holds the lock, for the message of a run refused meanwhile (skipped on a read-only descriptor)."""
    text = (f"{stage}, pid {os.getpid()} on {socket.gethostname()}, since "
            f"{dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}").encode()
    try:
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, text, 0)
    except OSError:
        pass
