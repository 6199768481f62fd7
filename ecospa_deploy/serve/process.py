"""Run ``ecospa serve`` in a child process on a free loopback port (tests, load tests, scripts).

The child binds ``--port 0`` and prints its URL; this reads it from the child's stdout, so
there is no race for a port chosen in advance.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

_URL = re.compile(r"at (http://\S+?)/v1\b")
# the server is on loopback: never through a proxy the environment names
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ServerProcess:
    """``with ServerProcess(path, "--backend", "hf") as srv: srv.url`` — SIGTERM on exit."""

    def __init__(self, model_path: str | os.PathLike, *args: str, startup_timeout: float = 120.0,
                 env: dict[str, str] | None = None) -> None:
        self.cmd = [sys.executable, "-m", "ecospa_deploy.cli", "serve", str(model_path),
                    "--host", "127.0.0.1", "--port", "0", *args]
        self.startup_timeout = startup_timeout
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.url: str | None = None
        self.output: list[str] = []
        self._reader: threading.Thread | None = None

    @property
    def log(self) -> str:
        return "".join(self.output)

    def start(self) -> "ServerProcess":
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=self.env, start_new_session=True)
        found = threading.Event()
        stdout = self.proc.stdout

        def read() -> None:
            for line in stdout:
                self.output.append(line)
                match = _URL.search(line)
                if match and self.url is None:
                    self.url = match.group(1)
                    found.set()
            found.set()

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + self.startup_timeout
        found.wait(self.startup_timeout)
        if self.url is None:
            self.stop()
            raise RuntimeError(f"server did not start ({' '.join(self.cmd)}):\n{self.log}")
        while time.monotonic() < deadline:
            try:
                with _DIRECT.open(self.url + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server at {self.url} never became healthy:\n{self.log}")

    def terminate(self) -> None:
        """Send SIGTERM (graceful shutdown) without waiting."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 60.0) -> int:
        if self.proc is None:
            raise RuntimeError("the server was never started")
        code = self.proc.wait(timeout)
        if self._reader is not None:
            self._reader.join(5)
        return code

    def stop(self, timeout: float = 60.0) -> int | None:
        if self.proc is None:
            return None
        self.terminate()
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.wait(timeout)

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

