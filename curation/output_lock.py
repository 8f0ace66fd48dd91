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


@contextmanager
def output_lock(output: str | Path | None, stage: str) -> Iterator[None]:
    """Hold the output for this run, or raise OutputBusy naming the run that holds it. No output (an error
    the stage raises itself) or a filesystem without locks (some network mounts) runs unlocked."""
    if not output:
        yield
        return
    path = lock_path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "a live process"
            raise OutputBusy(f"{stage}: {output} is being written by another run ({holder}); wait for it to end, "
                             f"or choose another --output") from None
        except OSError:
            yield
            return
        handle.truncate(0)
        handle.write(f"{stage}, pid {os.getpid()} on {socket.gethostname()}, since "
                     f"{dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
