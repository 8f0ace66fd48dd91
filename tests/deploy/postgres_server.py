"""A throwaway PostgreSQL server for tests: Debian's binaries, a temp data dir, 127.0.0.1 on a free port.

PostgreSQL refuses to run as root, so under root the server runs as the
`postgres` system user (Debian's package creates it).
"""

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path


def binaries() -> Path | None:
    """The directory of initdb/pg_ctl, or None when PostgreSQL is not installed."""
    found = shutil.which("initdb")
    if found:
        return Path(os.path.realpath(found)).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(candidates[-1]).parent if candidates else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_server_user(command: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return command
    return ["runuser", "-u", "postgres", "--", *command]


@contextlib.contextmanager
def running_postgres(user: str = "dagster", db: str = "dagster"):
    """Yield connection settings of a fresh server; stop it (fast), delete its files, leave nothing running.

    The data dir is a fresh directory under the system temp dir (pytest's own
    tmp dirs are private to the current user, so the server user could not enter them).
    """
    bin_dir = binaries()
    assert bin_dir is not None, "PostgreSQL binaries not found"
    workdir = Path(tempfile.mkdtemp(prefix="clip-curation-pg-"))
    data, sockets, log = workdir / "data", workdir / "sockets", workdir / "server.log"
    sockets.mkdir()
    if os.geteuid() == 0:
        server = pwd.getpwnam("postgres")
        for path in (workdir, sockets):
            os.chown(path, server.pw_uid, server.pw_gid)
    port = _free_port()
    run = lambda cmd: subprocess.run(_as_server_user(cmd), check=True, capture_output=True, text=True)  # noqa: E731
    run([str(bin_dir / "initdb"), "-D", str(data), "-U", user, "--auth=trust", "-E", "UTF8", "--no-sync"])
    run([str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "start",
         "-o", f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off"])
    try:
        run([str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", user, db])
        yield {"host": "127.0.0.1", "port": port, "user": user, "password": "", "db": db}
    finally:
        subprocess.run(_as_server_user([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]),
                       capture_output=True)
        shutil.rmtree(workdir, ignore_errors=True)
