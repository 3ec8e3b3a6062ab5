"""A real, throwaway PostgreSQL server: Debian's binaries, a cluster made by initdb in a temporary
folder, run as the `postgres` user when the tests run as root (initdb and postgres refuse root).

    with TemporaryPostgres() as server:          # 127.0.0.1 on a free port
        url = server.url()                        # postgresql://lb:<password>@127.0.0.1:<port>/lb
        server.stop(); server.start()             # the same cluster, down and up again

`host` may be any address of this machine, or of a network namespace with `wrap` as the command
prefix that enters it (`TemporaryPostgres("10.0.0.2", 5432, wrap=["ip", "netns", "exec", "pg"])`).
Connections over TCP need the password (scram-sha-256), so a test that leaves it out fails as it
would in production.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

BIN_DIRS = [Path(f"/usr/lib/postgresql/{version}/bin") for version in (17, 16, 15, 14, 13)]
RUN_AS = "postgres"  # the system user Debian's package makes


def find_bin_dir() -> Path | None:
    """Where initdb and postgres are: Debian's versioned folder, or the PATH."""
    for folder in BIN_DIRS:
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def unavailable_reason() -> str | None:
    """Why a temporary PostgreSQL cannot run here, or None when it can."""
    if os.name != "posix":
        return "PostgreSQL tests need a POSIX system"
    if find_bin_dir() is None:
        return "PostgreSQL is not installed (initdb not found; apt-get install postgresql)"
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            return "running as root without runuser: cannot start PostgreSQL as another user"
        try:
            import pwd

            pwd.getpwnam(RUN_AS)
        except KeyError:
            return f"running as root and there is no {RUN_AS!r} user to run PostgreSQL as"
    return None


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


class TemporaryPostgres:
    """One PostgreSQL cluster in a temporary folder, listening on `host`:`port` (a free one when 0)
    and on a unix socket in that folder; removed by `cleanup()` (or on leaving `with`)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        user: str = "lb",
        password: str = "lb-test-password",
        database: str = "lb",
        wrap: Sequence[str] = (),
        settings: dict[str, str] | None = None,
    ) -> None:
        reason = unavailable_reason()
        if reason is not None:
            raise RuntimeError(reason)
        bin_dir = find_bin_dir()
        assert bin_dir is not None
        self.bin_dir = bin_dir
        self.host = host
        # A free port is looked for here; in another namespace (`wrap`), name one (or get 5432).
        self.port = port or (5432 if wrap else free_port(host))
        self.user, self.password, self.database = user, password, database
        self.wrap = list(wrap)
        # Durability is not what these tests measure: no fsync keeps start-up and writes fast.
        self.settings = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off", **(settings or {})}
        self.folder = Path(tempfile.mkdtemp(prefix="lb-postgres-"))
        self.data = self.folder / "data"
        self.log_file = self.folder / "postgres.log"
        self._as_root = os.geteuid() == 0
        if self._as_root:
            shutil.chown(self.folder, RUN_AS, RUN_AS)
        self._initialised = False
        self.running = False

    def url(self, *, password: bool = True) -> str:
        """The URL to the test database; `password=False` leaves the password out (to give it apart)."""
        secret = f":{self.password}" if password else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"postgresql://{self.user}{secret}@{host}:{self.port}/{self.database}"

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        command = [*self.wrap, *(["runuser", "-u", RUN_AS, "--"] if self._as_root else []), *args]
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
        if result.returncode != 0:
            log = self.log_file.read_text(errors="replace")[-2000:] if self.log_file.exists() else ""
            raise RuntimeError(f"{' '.join(args[:2])} failed ({result.returncode}): {result.stderr.strip()}\n{log}")
        return result

    def _initdb(self) -> None:
        password_file = self.folder / "password"
        password_file.write_text(self.password + "\n")
        if self._as_root:
            shutil.chown(password_file, RUN_AS, RUN_AS)
        self._run(
            str(self.bin_dir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            self.user,
            f"--pwfile={password_file}",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--encoding=UTF8",
            "--no-sync",
            "--no-instructions",
        )
        password_file.unlink()
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(f"listen_addresses = '{self.host}'\nport = {self.port}\nunix_socket_directories = '{self.folder}'\n")
            conf.writelines(f"{key} = {value}\n" for key, value in self.settings.items())
        # Any address may connect (a namespace test reaches it from other hosts), always with the password.
        with (self.data / "pg_hba.conf").open("a") as hba:
            hba.write("host all all 0.0.0.0/0 scram-sha-256\nhost all all ::/0 scram-sha-256\n")
        self._initialised = True

    def start(self) -> None:
        """Make the cluster (the first time) and start the server; returns once it accepts connections."""
        if not self._initialised:
            self._initdb()
        self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log_file), "-w", "-t", "30", "start")
        self.running = True
        if not (self.data / ".db_created").exists():
            self.psql(f"CREATE DATABASE {self.database}", database="postgres")
            (self.data / ".db_created").touch()

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (`fast`: connections are cut, as a restart or a failover cuts them)."""
        if self.running:
            self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "30", "stop")
            self.running = False

    def psql(self, sql: str, *, database: str | None = None) -> str:
        """Run SQL through the unix socket (no password needed there); returns psql's output."""
        result = self._run(
            str(self.bin_dir / "psql"),
            "-h",
            str(self.folder),
            "-p",
            str(self.port),
            "-U",
            self.user,
            "-d",
            database or self.database,
            "-v",
            "ON_ERROR_STOP=1",
            "-At",
            "-c",
            sql,
        )
        return result.stdout

    def cleanup(self) -> None:
        """Stop the server if it runs and remove the folder."""
        try:
            if self.running:
                self.stop("immediate")
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> TemporaryPostgres:
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None) -> None:
        self.cleanup()


TASK_TABLES = ("tasks", "schema_version")


def reset_task_tables(server: TemporaryPostgres) -> None:
    """An empty database for the next test: lb_system's tables dropped (the server started if a
    test stopped it and failed half-way)."""
    if not server.running:
        server.start()
    server.psql(f"DROP TABLE IF EXISTS {', '.join(TASK_TABLES)}")
