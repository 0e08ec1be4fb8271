"""A real PostgreSQL server for the tests, from Debian's package: made in a temporary directory,
listening only on a UNIX socket there (no TCP port), run as the `postgres` user, stopped and removed
at the end of the session."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager


def _bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        raise RuntimeError(
            f"PostgreSQL's {name} is not installed (Debian package `postgresql`); `make test` installs it"
        )
    return found[-1]


class Server:
    def __init__(self, root: str) -> None:
        self.root = root
        self.data = f"{root}/data"
        self.sockets = f"{root}/run"

    def url(self, database: str = "corral") -> str:
        return f"postgresql:///{database}?host={self.sockets}&user=postgres"

    def _as_postgres(self, *argv: str) -> None:
        argv = ("runuser", "-u", "postgres", "--", *argv)
        subprocess.run(argv, check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        self._as_postgres(
            _bin("pg_ctl"),
            "-D",
            self.data,
            "-w",
            "-l",
            f"{self.root}/log",
            "-o",
            f"-k {self.sockets} -c listen_addresses='' -c fsync=off",
            "start",
        )

    def stop(self) -> None:
        self._as_postgres(_bin("pg_ctl"), "-D", self.data, "-w", "-m", "fast", "stop")

    def create_database(self, name: str) -> str:
        self._as_postgres(_bin("createdb"), "-h", self.sockets, name)
        return self.url(name)


@contextmanager
def server() -> Iterator[Server]:
    root = tempfile.mkdtemp(prefix="corral-pg-")
    os.chmod(root, 0o755)
    shutil.chown(root, "postgres", "postgres")
    s = Server(root)
    os.makedirs(s.sockets)
    shutil.chown(s.sockets, "postgres", "postgres")
    s._as_postgres(_bin("initdb"), "-D", s.data, "-A", "trust", "-U", "postgres", "--no-sync")
    s.start()
    try:
        yield s
    finally:
        try:
            s.stop()
        finally:
            shutil.rmtree(root, ignore_errors=True)
