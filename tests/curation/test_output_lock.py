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
