"""One run at a time per output: a second is refused naming the first; a killed holder frees the output."""

import signal
import subprocess
import sys

import pytest

from curation.output_lock import OutputBusy, lock_path, output_lock

HOLD = """
import sys, time
from curation.output_lock import output_lock
with output_lock(sys.argv[1], "balance"):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_second_run_is_refused_while_the_first_lives_and_may_run_once_it_is_killed(tmp_path):
    output = tmp_path / "balanced"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(output)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputBusy, match=rf"{output} is being written by another run \(balance, pid {holder.pid}"):
            with output_lock(output, "rewrite"):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with output_lock(output, "rewrite"):  # the kernel dropped the dead run's lock
        assert "rewrite, pid" in lock_path(output).read_text()
    assert not output.exists()  # beside the output, which --overwrite may delete whole


def test_no_output_runs_unlocked():
    with output_lock(None, "ingest"):
        pass


def test_a_lock_file_this_user_cannot_open_or_lock_runs_unlocked_and_says_so(tmp_path, monkeypatch, capsys):
    """A read-only parent folder, another user's lock file, a mount without locks: the run goes on as before
    the lock existed, and an error of the stage itself is not reported as one of the lock."""
    import errno
    import fcntl
    import os

    real_open = os.open

    def no_create(path, flags, *args):
        if flags & os.O_CREAT:
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_open(path, flags, *args)

    lock_path(tmp_path / "out").write_text("")  # another user's, read-only to this one
    monkeypatch.setattr(os, "open", no_create)
    with output_lock(tmp_path / "out", "balance"):  # locked through a read-only descriptor
        with pytest.raises(OutputBusy):
            with output_lock(tmp_path / "out", "balance"):
                pass
    with output_lock(tmp_path / "elsewhere" / "out", "balance"):  # cannot be created at all
        pass
    assert "cannot be locked here" in capsys.readouterr().out
    monkeypatch.setattr(fcntl, "flock", lambda *a: (_ for _ in ()).throw(OSError(errno.ENOLCK, "No locks")))
    with pytest.raises(ValueError, match="--t must be positive") as info:
        with output_lock(tmp_path / "nfs", "balance"):
            raise ValueError("--t must be positive")
    assert info.value.__context__ is None
