"""Servers of our own for the multi-worker and outage tests: PostgreSQL databases created and dropped per test, a
private PostgreSQL instance to stop and start, an MLflow tracking server on 127.0.0.1, and a TCP relay that can cut
the line."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.stores import EMPTY, empty_stores

PG_SERVER = os.environ.get("ABLATE_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_reachable(url: str) -> str:
    try:
        import psycopg

        psycopg.connect(url.replace("+psycopg", ""), connect_timeout=3).close()
    except Exception as err:
        return f"{type(err).__name__}: {err}".splitlines()[0]
    return ""


@contextlib.contextmanager
def pg_database(server_url: str = PG_SERVER) -> Iterator[str]:
    """A database created for one test and dropped after it (WITH (FORCE): leftover sessions do not keep it): a new
    user's empty database, never tables left behind by an earlier run, so a first-use race cannot hide."""
    import psycopg

    reason = _pg_reachable(server_url)
    if reason:
        pytest.skip(f"PostgreSQL not reachable at {server_url} ({reason})")
    server = server_url.replace("+psycopg", "")
    db = f"ablate_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    try:
        yield server_url.rsplit("/", 1)[0] + f"/{db}"
    finally:
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name) or sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found if isinstance(found, str) else (found[-1] if found else None)


class PostgresServer:
    """A PostgreSQL instance of its own (``initdb`` in a temp folder, a free port on 127.0.0.1, trust auth), to stop
    and start under a running study. As root, its programs run as the ``postgres`` user (they refuse root)."""

    def __init__(self) -> None:
        self.initdb, self.pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
        if not (self.initdb and self.pg_ctl):
            pytest.skip("initdb/pg_ctl not found (PostgreSQL server binaries)")
        self.root = Path(tempfile.mkdtemp(prefix="ablate-pg-"))
        self.port = free_port()
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                pytest.skip("running as root and no postgres user to run initdb as")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.data, self.log = self.root / "data", self.root / "server.log"
        out = self._run([self.initdb, "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync",
                         "--no-instructions"])  # fmt: skip
        if out.returncode != 0:
            shutil.rmtree(self.root, ignore_errors=True)
            pytest.skip(f"initdb cannot run here: {(out.stdout + out.stderr).strip().splitlines()[-1:]}")
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, cmd: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(self.as_user + cmd, capture_output=True, text=True, timeout=120)

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        out = self._run([self.pg_ctl, "-D", str(self.data), "-l", str(self.log), "-o", opts, "-w", "start"])
        assert out.returncode == 0, out.stdout + out.stderr + (self.log.read_text() if self.log.exists() else "")

    def stop(self) -> None:
        """As an operator's restart does: sessions are ended (``-m fast``), clients see their connections drop."""
        self._run([self.pg_ctl, "-D", str(self.data), "-m", "fast", "-w", "stop"])

    def close(self) -> None:
        self._run([self.pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop"])
        shutil.rmtree(self.root, ignore_errors=True)


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 and a free port, over a SQLite store in ``root``; can be stopped and started."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> None:
        empty_stores()
        if not (self.root / "mlflow.db").exists():  # migrating a fresh store takes the server seconds: copy one
            shutil.copy(EMPTY / "mlflow.db", self.root / "mlflow.db")
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
               "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1",
               "--port", str(self.port), "--workers", "1"]  # fmt: skip
        log = open(self.root / "server.log", "ab")  # noqa: SIM115 (the server writes it until stopped)
        self.proc = subprocess.Popen(cmd, cwd=self.root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.proc.poll() is None, (self.root / "server.log").read_text()[-3000:]
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"{self.uri}/health", timeout=2).close()
                return
            time.sleep(0.5)
        raise AssertionError(f"mlflow server not up in {timeout} s: {(self.root / 'server.log').read_text()[-3000:]}")

    def stop(self) -> None:
        """The whole process group (the server and its workers) killed, as a crash or a host going down would."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


class TcpRelay:
    """127.0.0.1:``port`` relayed to 127.0.0.1:``target``, to cut a link as a stopped server does and restore it at
    once. ``cut()`` resets every relayed connection and stops listening (new connections are refused)."""

    def __init__(self, target: int) -> None:
        self.target, self.port = target, free_port()
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._listening = threading.Event()
        self.restore()

    def restore(self) -> None:
        listener = socket.create_server(("127.0.0.1", self.port))  # SO_REUSEADDR: the same port again
        listener.settimeout(0.2)
        self._listening.set()
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        self._listening.clear()
        time.sleep(0.5)  # the accept loop closes its listener
        with self._lock:
            for s in self._open:  # shutdown wakes the pump blocked in recv (close alone would not, on Linux)
                with contextlib.suppress(OSError):
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    s.shutdown(socket.SHUT_RDWR)
                    s.close()  # linger 0: a reset, as when the server's process dies
            self._open.clear()

    def _accept(self, listener: socket.socket) -> None:
        with listener:
            while self._listening.is_set():
                try:
                    client, _ = listener.accept()
                except TimeoutError:
                    continue
                try:
                    server = socket.create_connection(("127.0.0.1", self.target))
                except OSError:
                    client.close()
                    continue
                with self._lock:
                    self._open += [client, server]
                for a, b in ((client, server), (server, client)):
                    threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
