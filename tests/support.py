"""Helpers for tests: deadlines instead of sleeps, servers in threads, loopback clients."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import socket
import ssl
import types
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from prefork.config import Settings
from prefork.pool import PoolConfig

# Every socket a test opens gets this timeout, so no test can hang on the network.
SOCKET_TIMEOUT = 10.0

# The tests that load both cores on their own for seconds (a soak, a kill storm, locust, a race
# repeated): the suite runs on two xdist workers with --dist loadgroup, which runs every test so
# marked on one worker, one after another, so that two of them never overlap.
# tests/test_suite_grouping.py checks that the group takes effect (pytest 9.2 broke it, hence
# the bound on pytest in pyproject.toml).
heavy = pytest.mark.xdist_group("heavy")


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.01,
               fail: bool = True, message: str = "") -> Any:
    """Poll *predicate* until it returns a true value or *timeout* passes.

    Returns the value; on timeout raises AssertionError (or returns the false value if not *fail*).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            if fail:
                raise AssertionError(message or f"condition not met within {timeout}s: {predicate}")
            return value
        time.sleep(interval)


@contextlib.contextmanager
def serving(server: Any, poll_interval: float = 0.5) -> Iterator[Any]:
    """Run server.serve_forever() in a thread for the duration of the block, then stop and close."""
    thread = threading.Thread(target=server.serve_forever, args=(poll_interval,), name="serve_forever")
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        thread.join(timeout=SOCKET_TIMEOUT)
        server.server_close()
        assert not thread.is_alive(), "serve_forever() did not return after shutdown()"


def stream_request(address: Any, payload: bytes, family: int = socket.AF_INET) -> bytes:
    """Connect, send *payload*, half-close, and read the reply until the server closes."""
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(SOCKET_TIMEOUT)
        sock.connect(address)
        if payload:  # sending nothing to a Unix peer that already answered and closed is EPIPE
            sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return recv_all(sock)


def recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def datagram_request(address: Any, payload: bytes, family: int = socket.AF_INET,
                     bind: Any = None) -> bytes:
    """Send one datagram and return the one reply."""
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(SOCKET_TIMEOUT)
        if bind is not None:
            sock.bind(bind)
        sock.sendto(payload, address)
        return sock.recv(65536)


def require_tool(name: str) -> str:
    """The path of the external tool *name*; skip the test if it is missing.

    CI installs every tool the tests use and sets CI_REQUIRE_TOOLS=1, so there a missing
    tool fails the test instead of skipping it: nothing passes in CI by not running.
    """
    import os
    import shutil

    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI_REQUIRE_TOOLS") == "1":
            pytest.fail(f"{name} is required in CI (CI_REQUIRE_TOOLS=1) but is not installed")
        pytest.skip(f"needs {name} (installed by .ci/run)")
    return path


def skip_or_fail(reason: str) -> None:
    """Skip the test for *reason*; under CI_REQUIRE_TOOLS=1 (CI) fail instead: nothing passes
    in CI by not running."""
    import os

    if os.environ.get("CI_REQUIRE_TOOLS") == "1":
        pytest.fail(f"{reason}; CI_REQUIRE_TOOLS=1 forbids skipping it")
    pytest.skip(reason)


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group *pgid*."""
    import os

    import psutil

    members = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc.pid)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


def kill_process_group(pgid: int, term_grace: float = 5.0, kill_grace: float = 10.0) -> None:
    """Teardown: TERM, then KILL, the process group a test started, until none of it is left."""
    import os
    import signal

    for signum, grace in ((signal.SIGTERM, term_grace), (signal.SIGKILL, kill_grace)):
        try:
            os.killpg(pgid, signum)
        except ProcessLookupError:
            return
        if wait_until(lambda: not group_members(pgid), grace, fail=False):
            return


def pool_config(**values: Any) -> PoolConfig:
    """A PoolConfig as the master builds it, from Settings' defaults (but one worker) and *values*.

    Unvalidated, as a policy test needs: the pool is tested with combinations config refuses.
    """
    defaults = {f.name: f.default for f in dataclasses.fields(Settings) if f.default is not dataclasses.MISSING}
    return PoolConfig.from_settings(types.SimpleNamespace(**{**defaults, "workers": 1, **values}))


class Certs:
    """A CA with a server certificate for 127.0.0.1/localhost, client certificates (good, expired,
    from an unknown CA) and a second server certificate (a rotation), written as PEM files."""

    def __init__(self, directory: Path) -> None:
        try:
            import trustme
        except ImportError:
            skip_or_fail("needs trustme (pip install -e '.[test]')")
        self.dir = directory
        ca, stranger_ca = trustme.CA(), trustme.CA()
        yesterday = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=1)
        self.ca = self._write("ca.pem", ca.cert_pem.bytes())
        self.server = self._pair("server", ca.issue_cert("127.0.0.1", "localhost"))
        self.rotated = self._pair("rotated", ca.issue_cert("127.0.0.1", "localhost"))
        self.client = self._pair("client", ca.issue_cert("client@example.com"))
        self.expired = self._pair("expired", ca.issue_cert("old@example.com", not_before=yesterday - datetime.timedelta(days=30),
                                                           not_after=yesterday))
        self.stranger = self._pair("stranger", stranger_ca.issue_cert("stranger@example.com"))

    def _write(self, name: str, data: bytes) -> Path:
        path = self.dir / name
        path.write_bytes(data)
        return path

    def _pair(self, name: str, cert: Any) -> tuple[Path, Path]:
        return (self._write(f"{name}.crt", b"".join(pem.bytes() for pem in cert.cert_chain_pems)),
                self._write(f"{name}.key", cert.private_key_pem.bytes()))

    def client_context(self, pair: tuple[Path, Path] | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca))
        if pair is not None:
            context.load_cert_chain(*map(str, pair))
        return context
