"""A real PostgreSQL server for the tests: its own cluster in a temporary directory, torn down after.

``PgCluster`` runs ``initdb`` and ``pg_ctl`` (PostgreSQL refuses to run as root, so as root they run as the
``postgres`` user through ``runuser``) with the data directory and the unix socket in one temporary
directory, listening on a free TCP port on 127.0.0.1 only. The superuser logs in over TCP with a password
(scram), so the tests exercise the same ``postgresql://user:pass@host:port/db`` URLs operators write.

Where the binaries come from: ``PG_BINDIR`` (only there, when set), else ``pg_config --bindir``, else the newest
``/usr/lib/postgresql/*/bin``, else ``initdb`` on PATH. When none is found, or the server will not start,
:func:`unavailable` fails the test in CI (``CI`` set to true: ``.ci/run`` installs the server, so a missing
one is a broken CI, not a reason to skip) and skips it, with the reason, on a developer machine.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import NoReturn

import pytest

SUPERUSER = "imagine"
#: Deliberately long and odd, so a test can look for it in an error message or a log line.
PASSWORD = "s3cret-Pg-pa55word"
START_TIMEOUT_S = 60


class ClusterError(Exception):
    """PostgreSQL could not be found or started; the message says which and how to fix it.

    ``missing`` is True when the binaries are not installed (the only case a developer machine may skip).
    """

    def __init__(self, message: str, *, missing: bool = False) -> None:
        super().__init__(message)
        self.missing = missing


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def unavailable(reason: str, *, missing: bool = True) -> NoReturn:
    """Skip only when the binaries are missing on a developer machine; fail otherwise: a CI run must never
    pass without having run the PostgreSQL tests, and a server that is installed but will not start is a bug."""
    if in_ci():
        pytest.fail(f"PostgreSQL tests cannot run in CI: {reason}", pytrace=False)
    if not missing:
        pytest.fail(f"PostgreSQL could not be started: {reason}", pytrace=False)
    pytest.skip(f"PostgreSQL not available: {reason}")


def find_bindir() -> Path | None:
    """The directory holding ``initdb`` and ``pg_ctl``, or None."""
    candidates: list[Path] = []
    if os.environ.get("PG_BINDIR"):  # explicit: the only place to look
        directory = Path(os.environ["PG_BINDIR"])
        return directory if (directory / "initdb").is_file() and (directory / "pg_ctl").is_file() else None
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            )
            candidates.append(Path(out.stdout.strip()))
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    candidates.extend(versions)
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).parent)
    for directory in candidates:
        if (directory / "initdb").is_file() and (directory / "pg_ctl").is_file():
            return directory
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PgCluster:
    """One throw-away PostgreSQL cluster; ``start()``/``stop()`` may be called again (outage tests)."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="imagine-pg-"))
        self.datadir = self.root / "data"
        self.socketdir = self.root
        self.logfile = self.root / "server.log"
        self.port = free_port()
        self.host = "127.0.0.1"
        self._as: list[str] = []
        self._uid: int | None = None
        self._counter = 0
        if os.geteuid() == 0:
            try:
                entry = pwd.getpwnam("postgres")
            except KeyError:
                raise ClusterError(
                    "running as root and there is no 'postgres' user to run initdb as; "
                    "install the server package (apt-get install postgresql)"
                ) from None
            if shutil.which("runuser") is None:
                raise ClusterError("running as root and runuser (util-linux) is missing")
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
            self._uid = entry.pw_uid
        self.root.chmod(0o700)

    # -- running the tools --------------------------------------------------------------------------------

    def _run(self, *args: str, timeout: float = START_TIMEOUT_S) -> None:
        command = [*self._as, str(self.bindir / args[0]), *args[1:]]
        try:
            completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ClusterError(f"{args[0]} did not run: {exc}") from None
        if completed.returncode != 0:
            log_tail = ""
            if self.logfile.exists():
                log_tail = " | ".join(self.logfile.read_text(errors="replace").strip().splitlines()[-5:])
            detail = (completed.stderr or completed.stdout).strip().replace("\n", " | ")
            raise ClusterError(f"{args[0]} failed (exit {completed.returncode}): {detail} {log_tail}".strip())

    def init(self) -> None:
        pwfile = self.root / "pwfile"
        pwfile.write_text(PASSWORD + "\n")
        if self._uid is not None:
            os.chown(pwfile, self._uid, -1)
        pwfile.chmod(0o600)
        self._run(
            "initdb",
            "-D",
            str(self.datadir),
            "-U",
            SUPERUSER,
            f"--pwfile={pwfile}",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--encoding=UTF8",
            "--no-sync",  # a test cluster; nothing here must survive a power cut
        )
        pwfile.unlink()

    def start(self) -> None:
        options = " ".join(
            [
                f"-p {self.port}",
                f"-k {self.socketdir}",
                f"-c listen_addresses={self.host}",
                # Durability buys nothing in a throw-away cluster and costs CI seconds.
                "-c fsync=off",
                "-c synchronous_commit=off",
                "-c full_page_writes=off",
                "-c max_connections=200",
            ]
        )
        self._run(
            "pg_ctl",
            "-D",
            str(self.datadir),
            "-l",
            str(self.logfile),
            "-w",
            "-t",
            "30",
            "-o",
            options,
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        """``fast``: disconnect clients now (what a restart or failover looks like to the bot);
        ``immediate``: no goodbye to anyone (a crash, a pulled cable), recovery on the next start."""
        self._run("pg_ctl", "-D", str(self.datadir), "-m", mode, "-w", "-t", "30", "stop")

    def destroy(self) -> None:
        with contextlib.suppress(ClusterError):
            self._run("pg_ctl", "-D", str(self.datadir), "-m", "immediate", "-w", "-t", "30", "stop")
        shutil.rmtree(self.root, ignore_errors=True)

    # -- addresses ------------------------------------------------------------------------------------------

    def url(self, database: str = "postgres", *, password: str = PASSWORD) -> str:
        return f"postgresql://{SUPERUSER}:{password}@{self.host}:{self.port}/{database}"

    def create_database(self, prefix: str = "t") -> str:
        """A new, empty database; returns its URL. Databases are cheap: one per test keeps tests apart.

        Synchronous (its own event loop, in a thread) so that sync fixtures, which run outside the test's
        loop, can call it.
        """
        self._counter += 1
        name = f"{prefix}_{os.getpid()}_{self._counter}"

        async def create() -> None:
            import asyncpg

            conn = await asyncpg.connect(self.url())
            try:
                await conn.execute(f'CREATE DATABASE "{name}"')
            finally:
                await conn.close()

        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            pool.submit(asyncio.run, create()).result(timeout=60)
        return self.url(name)


def start_cluster() -> PgCluster:
    """Find the binaries, init and start a cluster; ClusterError with the reason when that is impossible."""
    bindir = find_bindir()
    if bindir is None:
        where = (
            f"PG_BINDIR={os.environ['PG_BINDIR']} has no initdb/pg_ctl"
            if os.environ.get("PG_BINDIR")
            else "initdb/pg_ctl not found (looked at pg_config --bindir, /usr/lib/postgresql/*/bin and PATH)"
        )
        raise ClusterError(f"{where}; install the server package: apt-get install postgresql", missing=True)
    cluster = PgCluster(bindir)
    try:
        cluster.init()
        try:
            cluster.start()
        except ClusterError:
            # The free port may have been taken between choosing it and binding it: one more go.
            cluster.port = free_port()
            cluster.start()
    except BaseException:
        cluster.destroy()
        raise
    return cluster
