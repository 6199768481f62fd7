"""Servers in child processes on loopback (tests, load tests, benchmarks): ``ecospa serve``
and the peers it is measured against.

``ecospa serve`` binds ``--port 0`` and prints its URL, which ``ServerProcess`` reads from its
stdout, so there is no race for a port chosen in advance; a peer that cannot do that gets a
port from ``free_port`` (``ChildServer``).
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


class ChildServer:
    """An HTTP server in a child process at a URL known in advance (``transformers serve`` on a
    port given to it): ``start`` waits until ``GET /health`` answers 200; SIGTERM on exit.
    ``log_path``: the child's output also goes there line by line as it comes, so a run that a
    time limit kills still leaves the server's side on disk."""

    def __init__(self, cmd: list[str], url: str | None = None, *, startup_timeout: float = 120.0,
                 env: dict[str, str] | None = None,
                 log_path: str | os.PathLike | None = None) -> None:
        self.cmd, self.url = cmd, url
        self.startup_timeout = startup_timeout
        self.log_path = log_path
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.output: list[str] = []
        self._reader: threading.Thread | None = None

    @property
    def log(self) -> str:
        return "".join(self.output)

    def _on_line(self, line: str) -> None:
        """Each line the child prints, as it comes (a subclass reads its URL here)."""

    def start(self) -> "ChildServer":
        stop_on_sigterm()
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=self.env, start_new_session=True)
        self._found = threading.Event()
        stdout = self.proc.stdout

        sink = open(self.log_path, "w", encoding="utf-8") if self.log_path else None

        def read() -> None:
            try:
                for line in stdout:
                    self.output.append(line)
                    if sink is not None:
                        sink.write(line)
                        sink.flush()
                    self._on_line(line)
            finally:
                if sink is not None:
                    sink.close()
                self._found.set()

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + self.startup_timeout
        self._wait_for_url()
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
        raise RuntimeError(f"server at {self.url} never became healthy "
                           f"({' '.join(self.cmd)}):\n{self.log}")

    def _wait_for_url(self) -> None:
        """The URL is known in advance here."""

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
        finally:
            self._kill_group()

    def _kill_group(self) -> None:
        """SIGKILL what is left of the child's process group (its own session): an engine
        core or compile workers that outlived it would hold the GPU and CPUs after it."""
        if hasattr(os, "killpg"):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def __enter__(self) -> "ChildServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def stop_on_sigterm() -> None:
    """Make SIGTERM (``timeout``, a job scheduler) end this process through ``SystemExit``, so
    each ``with ChildServer(...)`` stops its server on the way out. A server runs in a session
    of its own and outlives a parent that the signal kills outright: a benchmark cut by its time
    limit left a server compiling for minutes, starving the runs after it. Only from the main
    thread, and only over the default handler (one installed by someone else stays)."""
    if (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL):
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now on ``host`` (another process may take it before the child binds it)."""
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class ServerProcess(ChildServer):
    """``with ServerProcess(path, "--backend", "hf") as srv: srv.url`` — ``ecospa serve`` on a
    port it picks itself, read from its banner."""

    def __init__(self, model_path: str | os.PathLike, *args: str, startup_timeout: float = 120.0,
                 env: dict[str, str] | None = None,
                 log_path: str | os.PathLike | None = None) -> None:
        super().__init__([sys.executable, "-m", "ecospa_deploy.cli", "serve", str(model_path),
                          "--host", "127.0.0.1", "--port", "0", *args],
                         startup_timeout=startup_timeout, env=env, log_path=log_path)

    def _on_line(self, line: str) -> None:
        match = _URL.search(line)
        if match and self.url is None:
            self.url = match.group(1)
            self._found.set()

    def _wait_for_url(self) -> None:
        self._found.wait(self.startup_timeout)
        if self.url is None:
            self.stop()
            raise RuntimeError(f"server did not start ({' '.join(self.cmd)}):\n{self.log}")

    def __enter__(self) -> "ServerProcess":
        return self.start()
