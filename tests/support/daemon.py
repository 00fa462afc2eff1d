"""A real edgevoice daemon in a subprocess, with a fake systemd notify socket."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Daemon:
    """``python -m edgevoice serve`` with its own state dir, port and notify socket."""

    def __init__(
        self, tmp: Path, env: dict[str, str] | None = None, config: str | None = None, args: list[str] | None = None
    ) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.notify_path = str(tmp / "notify.sock")
        self.messages: list[str] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(self.notify_path)
        self._sock.settimeout(0.2)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._closed = False
        self.env = {
            **os.environ,
            "EDGEVOICE_STATE__DIR": str(tmp / "state"),
            "EDGEVOICE_SERVER__PORT": str(self.port),
            "NOTIFY_SOCKET": self.notify_path,
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        if "EDGEVOICE_CONFIG" not in (env or {}):
            self.env.pop("EDGEVOICE_CONFIG", None)
        self.args = [sys.executable, "-m", "edgevoice"]
        if config is not None:
            cfg = tmp / "edgevoice.toml"
            cfg.write_text(config)
            self.args += ["--config", str(cfg)]
        self.args += ["serve", *(args or [])]
        self.log_path = tmp / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def _read(self) -> None:
        while not self._closed:
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.extend(data.decode().split("\n"))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self, wait_ready: bool = True, timeout: float = 90) -> Daemon:
        self._reader.start()
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(self.args, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        if wait_ready:
            self.wait_for("READY=1", timeout)
        return self

    def wait_for(self, message: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while message not in self.messages:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode} before {message}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {message} within {timeout} s:\n{self.log()}")
            time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.close()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self.close()

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._closed = True
        self._sock.close()
        if hasattr(self, "_log"):
            self._log.close()

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
