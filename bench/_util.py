"""Helpers shared by the end-to-end benchmarks: free ports, child processes, timing statistics.

Every child process is started in its own session (so a Ctrl-C at the terminal reaches only the
benchmark, which then stops its children itself) and stopped by PID: SIGTERM, a grace period,
then SIGKILL. ``ProcessSet`` stops everything it started, newest first, when its ``with`` block
exits for any reason. As a safety net for a parent that dies without running its ``finally``
blocks (a crash in a native library), children are started through ``setpriv --pdeathsig TERM``
where util-linux has it: the kernel then sends them SIGTERM when their parent dies.
"""

from __future__ import annotations

import collections
import importlib.metadata
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, NoReturn

from kvpool.errors import KVPoolError
from kvpool.local import free_port, redis_argv

__all__ = [
    "LatencyStats",
    "ProcessSet",
    "Service",
    "ServiceError",
    "chunks",
    "format_size",
    "free_port",
    "install_interrupt_handlers",
    "run_main",
    "log",
    "start_kvpool_node",
    "start_redis",
    "median",
    "percentile",
    "wait_for_port",
]


def log(message: str) -> None:
    """A progress line on stderr (stdout is left for tables)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run_main(main: Callable[[], int]) -> NoReturn:
    """Exits with ``main()``'s code; a Ctrl-C exits 130 once ProcessSet has stopped everything."""
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; every process this run started has been stopped")
        sys.exit(130)


def install_interrupt_handlers() -> None:
    """SIGINT and SIGTERM raise KeyboardInterrupt, so ``finally`` blocks (and ProcessSet)
    clean up. SIGINT is set even when inherited as ignored (a job started with ``&``)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, handler)


def start_redis(procs: ProcessSet) -> tuple[Service, int]:
    """A redis-server of its own (``kvpool.local.redis_argv``) on a free port, ready."""
    port = free_port()
    try:
        argv = redis_argv(port)
    except KVPoolError as e:
        raise ServiceError(str(e)) from None
    service = procs.start("redis-server", argv)
    service.wait_for_line(r"Ready to accept connections", timeout=30)
    log(f"redis-server pid {service.pid} on 127.0.0.1:{port}")
    return service, port


def start_kvpool_node(
    args: Sequence[str], env: Mapping[str, str] | None = None
) -> tuple[Service, str]:
    """A ``kvpool server`` of this interpreter's kvpool on a free port (``--port 0``) with
    ``args``, its output drained; (the node, its host:port) once it listens. The node gets none
    of this process's ``KVPOOL_*`` variables, only those ``env`` names."""
    exe = Path(sys.executable).with_name("kvpool")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "kvpool"]
    base = {k: v for k, v in os.environ.items() if not k.startswith("KVPOOL_")}
    node = Service(
        "kvpool server",
        [*cmd, "server", "--port", "0", *args],
        env={**base, **(env or {})},
        inherit_env=False,
    )
    return node, node.wait_for_line(r"listening on (\S+:\d+)", timeout=120).group(1)


def wait_for_port(host: str, port: int, timeout: float, *, service: Service | None = None) -> None:
    """Polls until a TCP connect to host:port succeeds; ServiceError after ``timeout`` seconds
    or as soon as ``service`` (the process expected to listen) has exited."""
    deadline = time.monotonic() + timeout
    while True:
        if service is not None:
            service.check_alive()
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise ServiceError(
                    f"nothing listens on {host}:{port} after {timeout:.0f}s"
                ) from None
            time.sleep(0.02)


def format_size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return f"{n}B"


class ServiceError(RuntimeError):
    """A child process failed to start, exited early, or said something unexpected."""


class Service:
    """One child process whose output is drained by a thread (so pipes never fill), kept as the
    last ``keep_lines`` lines for error messages, and searchable while it arrives."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        keep_lines: int = 200,
        echo: str | None = None,
        quiet: str | None = None,
        inherit_env: bool = True,
    ) -> None:
        """``echo``: also copy each line to our stderr, behind this prefix, as it arrives,
        except lines that match the regex ``quiet`` (those are still kept for ``tail``).
        ``env`` adds to this process's environment, or replaces it without ``inherit_env``."""
        self.name = name
        self._echo = echo
        self._quiet = re.compile(quiet) if quiet else None
        self.argv = list(argv)
        self._lines: collections.deque[str] = collections.deque(maxlen=keep_lines)
        self._matches: list[re.Match[str]] = []
        self._pattern: re.Pattern[str] | None = None
        self._cond = threading.Condition()
        self._eof = False
        full_env = dict(os.environ) if inherit_env else {}
        if env:
            full_env.update(env)
        setpriv = shutil.which("setpriv")
        # setpriv execs the command, so the PID we hold stays the command's own.
        launch = [setpriv, "--pdeathsig", "TERM", *self.argv] if setpriv else self.argv
        self.proc = subprocess.Popen(
            launch,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            env=full_env,
            start_new_session=True,
        )
        self.pid = self.proc.pid
        self._reader = threading.Thread(target=self._drain, name=f"drain-{name}", daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            if self._echo is not None and not (self._quiet and self._quiet.search(line)):
                print(f"{self._echo}{line}", file=sys.stderr, flush=True)
            with self._cond:
                self._lines.append(line)
                if self._pattern is not None:
                    m = self._pattern.search(line)
                    if m is not None:
                        self._matches.append(m)
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def tail(self, n: int = 20) -> str:
        with self._cond:
            return "\n".join(list(self._lines)[-n:])

    def check_alive(self) -> None:
        rc = self.proc.poll()
        if rc is not None:
            raise ServiceError(f"{self.name} exited with status {rc}:\n{self.tail()}")

    def wait_for_line(self, pattern: str, timeout: float) -> re.Match[str]:
        """Blocks until a line (already seen or future) matches ``pattern``; ServiceError if the
        process exits or ``timeout`` seconds pass first."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            for line in self._lines:
                m = regex.search(line)
                if m is not None:
                    return m
            self._pattern = regex
            self._matches.clear()
            while not self._matches:
                if self._eof or self.proc.poll() is not None:
                    # Let the reader finish the last lines before giving up.
                    self._cond.wait(timeout=0.2)
                    if self._matches:
                        break
                    raise ServiceError(
                        f"{self.name} exited (status {self.proc.poll()}) before printing "
                        f"/{pattern}/:\n{self.tail()}"
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ServiceError(
                        f"{self.name} did not print /{pattern}/ within {timeout:.0f}s:\n"
                        f"{self.tail()}"
                    )
                self._cond.wait(timeout=min(left, 0.5))
            self._pattern = None
            return self._matches[0]

    def kill(self) -> None:
        """SIGKILL to our PID (if it still runs) and reap it."""
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()

    def wait(self) -> int:
        """Waits for the process to exit on its own (Ctrl-C interrupts) and for its output."""
        rc = self.proc.wait()
        self._reader.join(timeout=2.0)
        return rc

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM to our PID, SIGKILL after ``grace`` seconds; returns the exit status."""
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, signal.SIGTERM)
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                log(f"{self.name} (pid {self.pid}) ignored SIGTERM for {grace:.0f}s; SIGKILL")
                self.kill()
            except ProcessLookupError:
                pass
        self._reader.join(timeout=2.0)
        return self.proc.returncode


class ProcessSet:
    """Starts services and stops all of them (newest first) when the ``with`` block exits,
    on success, error or Ctrl-C alike."""

    def __init__(self) -> None:
        self._services: list[Service] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        echo: str | None = None,
        quiet: str | None = None,
    ) -> Service:
        service = Service(name, argv, env=env, echo=echo, quiet=quiet)
        self._services.append(service)
        return service

    def stop_all(self) -> None:
        interrupted = False
        while self._services:
            service = self._services.pop()
            try:
                service.stop()
            except KeyboardInterrupt:
                # Ctrl-C while stopping: no more grace, but leave no child behind either.
                interrupted = True
                service.kill()
        if interrupted:
            raise KeyboardInterrupt

    def __enter__(self) -> ProcessSet:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between closest ranks."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def chunks(items: Sequence[Any], n: int) -> list[Sequence[Any]]:
    """``items`` in consecutive slices of ``n`` (the last one shorter)."""
    return [items[i : i + n] for i in range(0, len(items), n)]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


@dataclass(frozen=True)
class LatencyStats:
    """Batch latencies in milliseconds."""

    count: int
    p50_ms: float
    p99_ms: float
    max_ms: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> LatencyStats:
        ms = [s * 1e3 for s in seconds]
        return cls(len(ms), percentile(ms, 50), percentile(ms, 99), max(ms, default=math.nan))


def run_meta(dists: Sequence[str], tools: Sequence[str], plan: Any) -> dict[str, Any]:
    """What a result file needs to be compared later: when, the command, the host, the versions
    of the Python distributions and command-line tools involved, the git commit, and the plan."""
    versions: dict[str, Any] = {}
    for dist in dists:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    for tool in tools:
        path = shutil.which(tool)
        if path:
            res = subprocess.run([path, "--version"], capture_output=True, text=True, check=False)
            text = (res.stdout or res.stderr).strip()
            versions[tool] = text.splitlines()[0] if res.returncode == 0 and text else "?"
    repo = Path(__file__).resolve().parents[1]
    git = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True
    )
    dirty = subprocess.run(
        ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
    )
    versions["git"] = {
        "head": git.stdout.strip(),
        "modified": [x[3:] for x in dirty.stdout.splitlines() if x.strip()],
    }
    return {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime()),
        "command": [sys.executable, *sys.argv],
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "versions": versions,
        "plan": asdict(plan),
    }
