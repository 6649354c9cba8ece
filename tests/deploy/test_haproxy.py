"""Two prefork instances behind a real HAProxy, configured from deploy/haproxy/haproxy.cfg,
under a client load: one instance is reloaded (HUP), upgraded (USR2), then stopped (TERM) and
started again, the way deploy/README.md says, and not one request fails. HAProxy sends each
connection's client in a PROXY v2 header, and the instances' access logs show the clients'
own address (they connect from 127.0.0.2; HAProxy from 127.0.0.1).

Also the container and Kubernetes health checks, run for real against a master."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from tests.deploy.conftest import DEPLOY, Master, Proc, clean_env, gone, load_yaml, prefork, render, run, tool
from tests.support import SOCKET_TIMEOUT, heavy, wait_until

pytestmark = pytest.mark.integration

# Health checks this often in the test (the deploy file says 2 s): an instance is seen down
# or up again within a few hundred milliseconds.
CHECK_INTERVAL = "100ms"
# Each client makes at most this many requests, whatever happens: the test is bounded in count.
MAX_REQUESTS_PER_CLIENT = 20_000
CLIENTS = 3
# The clients' own address, told apart from HAProxy's (127.0.0.1) in the instances' access logs.
CLIENT_HOST = "127.0.0.2"


class HAProxy(Proc):
    """haproxy -db on the deploy config, its listener handed over already bound (fd@): the test
    binds port 0 and reads the port back, so no port is guessed and nothing can take it first."""

    def __init__(self, directory: Path, sock_dir: Path, servers: dict[str, int]) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.address = self.listener.getsockname()
        self.admin = sock_dir / "haproxy.sock"
        config = directory / "haproxy.cfg"
        config.write_text(render((DEPLOY / "haproxy" / "haproxy.cfg").read_text(), [
            (r"^\s+(chroot|user|group|daemon)\b.*\n", ""),  # a foreground process of the test's
            (r"^(\s+)log /dev/log .*$", r"\1log stderr format raw local0 info"),
            (r"stats socket /run/haproxy/admin.sock", f"stats socket {self.admin}"),
            (r"^(\s+)bind :9000$", rf"\1bind fd@{self.listener.fileno()}"),
            (r"\binter 2s\b", f"inter {CHECK_INTERVAL}"),
            *[(rf"^(\s+)server {name} \S+$", rf"\1server {name} 127.0.0.1:{port}") for name, port in servers.items()],
        ]))
        super().__init__([tool("haproxy"), "-db", "-f", str(config)], directory / "haproxy.log",
                         pass_fds=(self.listener.fileno(),))
        self.listener.close()

    def command(self, line: str) -> str:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(SOCKET_TIMEOUT)
            sock.connect(str(self.admin))
            sock.sendall(line.encode() + b"\n")
            sock.shutdown(socket.SHUT_WR)
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def servers(self) -> dict[str, dict[str, str]]:
        """`show stat` of backend prefork: server name -> its row (status, scur, stot, ...)."""
        if not self.admin.exists():
            return {}
        lines = self.command("show stat").lstrip("# ").splitlines()
        return {row["svname"]: row for row in csv.DictReader(lines)
                if row["pxname"] == "prefork" and row["svname"] not in ("BACKEND", "FRONTEND")}

    def wait_status(self, name: str, status: str, timeout: float = 15.0) -> None:
        def reached() -> bool:
            assert self.alive(), f"haproxy exited:\n{self.log()}"
            return self.servers().get(name, {}).get("status") == status
        wait_until(reached, timeout, message=f"server {name} not {status}: {self.servers().get(name)}")

    def sessions(self, name: str) -> int:
        return int(self.servers()[name]["stot"])


class Load:
    """Clients through HAProxy: a new connection per request, a line out, the same line back."""

    def __init__(self, address) -> None:
        self.address = address
        self.ok = 0
        self.failures: list[str] = []
        self.phase = "start"
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._client, args=(i,), name=f"client-{i}") for i in range(CLIENTS)]
        for thread in self._threads:
            thread.start()

    def _client(self, number: int) -> None:
        for count in range(MAX_REQUESTS_PER_CLIENT):
            if self._stop.is_set():
                return
            line = f"client {number} request {count}".encode()
            try:
                with socket.create_connection(self.address, timeout=SOCKET_TIMEOUT,
                                              source_address=(CLIENT_HOST, 0)) as sock:
                    sock.sendall(line + b"\n")
                    reply = sock.makefile("rb").readline()
                failure = None if reply == line + b"\n" else f"{self.phase}: {line!r} got {reply!r}"
            except OSError as exc:
                failure = f"{self.phase}: {line!r}: {exc!r}"
            with self._lock:
                if failure:
                    self.failures.append(failure)
                else:
                    self.ok += 1

    def served(self, count: int = 200) -> None:
        """Wait until *count* more requests have been answered."""
        start = self.ok
        wait_until(lambda: self.ok - start >= count or self._stop.is_set(), 30,
                   message=f"load stalled in {self.phase} at {self.ok}: {self.failures[:3]}")

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(SOCKET_TIMEOUT * 2)


@pytest.fixture
def load_through():
    loads: list[Load] = []

    def start(address) -> Load:
        loads.append(Load(address))
        return loads[-1]

    yield start
    for load in loads:
        load.stop()


def echo_master(directory: Path, port: int = 0, proxy: bool = False) -> Master:
    """An echo instance; with *proxy*, as behind HAProxy: ?proxy, and an access log in its directory."""
    options = ["--access-log", str(directory / "access.log")] if proxy else []
    return Master(directory, ["--bind", f"tcp://127.0.0.1:{port}" + "?proxy" * proxy, "--workers", "2",
                              "--graceful-timeout", "5", *options, "workers.echo"])


def client_hosts(master: Master) -> set[str]:
    """The client hosts of the requests in *master*'s access log (workers flush it when idle)."""
    path = master.dir / "access.log"
    lines = path.read_text().splitlines() if path.exists() else []
    return {line.split()[1].rpartition(":")[0] for line in lines if " ok" in line}


@heavy
def test_two_instances_behind_haproxy_reload_upgrade_stop_and_restart_without_a_failed_request(
        tmp_path, sock_dir, processes, load_through):
    a, b = echo_master(tmp_path / "a", proxy=True), echo_master(tmp_path / "b", proxy=True)
    processes += [a, b]
    ports = {"a": a.wait_ready(2).tcp_port(), "b": b.wait_ready(2).tcp_port()}
    haproxy = HAProxy(tmp_path, sock_dir, ports)
    processes.append(haproxy)
    haproxy.wait_status("a", "UP")
    haproxy.wait_status("b", "UP")

    load = load_through(haproxy.address)
    load.served()
    wait_until(lambda: haproxy.sessions("a") > 0 and haproxy.sessions("b") > 0, 10,
               message=f"both instances should serve: {haproxy.servers()}")

    load.phase = "reload"  # HUP: workers replaced one by one, the listener never closes
    prefork("reload", "-p", str(a.pidfile))
    load.served()

    load.phase = "upgrade"  # USR2: a new master on the same socket; the old one leaves by itself
    old = a.master_pid()
    prefork("upgrade", "-p", str(a.pidfile))
    assert a.master_pid() != old and a.wait() == 0
    load.served()

    load.phase = "drain"  # stop and restart: out of HAProxy first (deploy/README.md), then TERM
    haproxy.command("set server prefork/a state drain")
    wait_until(lambda: haproxy.servers()["a"]["scur"] == "0", 10, message="connections to a do not end")
    load.phase = "stop"
    prefork("stop", "-p", str(a.pidfile))
    haproxy.wait_status("a", "DOWN")  # the health checks see it gone
    during = haproxy.sessions("a")
    load.served()
    assert haproxy.sessions("a") == during, "no request may be sent to a stopped instance"

    load.phase = "restart"
    again = echo_master(tmp_path / "a2", ports["a"], proxy=True)
    processes.append(again)
    again.wait_ready(2)
    haproxy.wait_status("a", "DRAIN")  # up for the checks, still drained by the operator
    haproxy.command("set server prefork/a state ready")
    haproxy.wait_status("a", "UP")
    wait_until(lambda: haproxy.sessions("a") > during, 10, message="the restarted instance gets no traffic")
    load.served()
    load.stop()

    assert load.failures == [] and load.ok >= 1000, (load.ok, load.failures[:10])
    assert haproxy.alive() and b.alive() and again.alive()
    # The clients' address, from HAProxy's PROXY header; the health checks (a LOCAL header) are
    # HAProxy's own connections, from 127.0.0.1.
    for instance in (b, again):
        wait_until(lambda: CLIENT_HOST in client_hosts(instance), 10, message=f"{instance.dir}: {client_hosts(instance)}")
        assert client_hosts(instance) <= {CLIENT_HOST, "127.0.0.1"}, client_hosts(instance)


# -- the health checks of the container and of Kubernetes ------------------------------------------


def test_container_healthcheck_and_kubernetes_probes_against_a_real_master(tmp_path, processes):
    """The image's HEALTHCHECK and the Deployment's probes, with the environment they get there
    (PREFORK_PIDFILE), pass against a serving master and fail once it has stopped."""
    master = echo_master(tmp_path / "m")
    processes.append(master)
    master.wait_ready(2)
    port = master.tcp_port()
    [deployment] = load_yaml(DEPLOY / "kubernetes" / "deployment.yaml")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    healthcheck = (DEPLOY / "Dockerfile").read_text().split("HEALTHCHECK", 1)[1].split("CMD", 1)[1].splitlines()[0]
    commands = {
        "HEALTHCHECK": json.loads(healthcheck),
        "livenessProbe": container["livenessProbe"]["exec"]["command"],
        "readinessProbe": container["readinessProbe"]["exec"]["command"],
    }
    bin_dir = str(Path(tool("prefork")).parent)  # the image puts /opt/prefork/bin first on PATH
    env = clean_env(PATH=f"{bin_dir}:{os.environ.get('PATH', '')}", PREFORK_PIDFILE=str(master.pidfile))

    def outcomes() -> dict[str, int]:
        return {name: run(argv, timeout=30, env=env, cwd=tmp_path).returncode for name, argv in commands.items()}

    assert outcomes() == {"HEALTHCHECK": 0, "livenessProbe": 0, "readinessProbe": 0}
    prefork("stop", "-p", str(master.pidfile))
    assert gone(master.pid)
    failed = outcomes()
    assert all(code != 0 for code in failed.values()), failed


def test_the_healthcheck_fails_while_workers_die_in_post_fork_and_passes_once_they_serve(tmp_path, processes):
    """A master whose workers cannot start is not healthy, though it runs and owns its pidfile."""
    directory = tmp_path / "m"
    directory.mkdir()
    (directory / "post_fork.fail").touch()  # the hook fails while this file exists
    env = {"PYTHONPATH": str(DEPLOY.parent)}
    master = Master(directory, ["--bind", "tcp://127.0.0.1:0", "--workers", "1", "--crash-limit", "0",
                                "--post-fork", "tests.reliability.hooks_fail:post_fork", "workers.echo"], env=env)
    processes.append(master)
    healthcheck = json.loads((DEPLOY / "Dockerfile").read_text().split("HEALTHCHECK", 1)[1].split("CMD", 1)[1]
                             .splitlines()[0])
    bin_dir = str(Path(tool("prefork")).parent)
    check_env = clean_env(PATH=f"{bin_dir}:{os.environ.get('PATH', '')}", PREFORK_PIDFILE=str(master.pidfile))

    def check() -> subprocess.CompletedProcess[str]:
        return run(healthcheck, timeout=30, env=check_env, cwd=tmp_path)

    failing = wait_until(lambda: (done := check()).returncode == 5 and done, 30, message=master.log())
    assert "crash loop" in failing.stdout and "post_fork hook failed: RuntimeError" in failing.stdout, failing.stdout
    assert master.alive()
    (directory / "post_fork.fail").unlink()
    master.wait_ready(1)
    port = master.tcp_port()
    with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT) as sock:
        sock.sendall(b"served\n")
        assert sock.makefile("rb").readline() == b"served\n"  # a worker that serves ends the streak
    passing = wait_until(lambda: (done := check()).returncode == 0 and done, 30, message=master.log())
    assert "healthy: 1 of 1 workers serving" in passing.stdout
