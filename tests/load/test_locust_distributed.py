"""Distributed locust, as loadtests/README.md documents it: a master and two workers on loopback.

The locust command lines are read from the README's "Distributed locust" section, so the
documented command is the tested one; only the ports (9000: the prefork master's, 5557: the
locust master's) are replaced by ports the kernel gave, and the reports go to the test's
directory through LOCUST_CSV and LOCUST_HTML.
"""

from __future__ import annotations

import csv
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.test_master import free_port_for_tcp_and_udp
from tests.load.conftest import ROOT, Group, LoadMaster, require_locust
from tests.support import heavy

pytestmark = [pytest.mark.integration, heavy]  # a locust master, two workers and a prefork master

README = ROOT / "loadtests" / "README.md"
# The README's run time is 3 s and the master waits at most 30 s for its workers; past this the
# run is killed and the test fails.
LOCUST_DEADLINE = 40.0
# The ports of the README's commands.
SERVER_PORT, LOCUST_PORT = "9000", "5557"
# locust.conf's users: at most this many requests are in flight when the run stops.
USERS = 8


def documented_commands() -> list[list[str]]:
    """The `.venv/bin/locust` lines of the README's "Distributed locust" section, as argv."""
    section = README.read_text().split("## Distributed locust", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block, "no ```sh block in the README's Distributed locust section"
    lines = [line.strip() for line in block.group(1).splitlines() if line.startswith(".venv/bin/locust ")]
    return [shlex.split(line.split("#")[0].rstrip(" &")) for line in lines]


def local(argv: list[str], server_port: int, locust_port: int) -> list[str]:
    """*argv* with this test's ports and Python: `.venv/bin/locust` is `python -m locust` here."""
    ports = {SERVER_PORT: str(server_port), LOCUST_PORT: str(locust_port)}
    swapped = [re.sub(r"\b(9000|5557)\b", lambda m: ports[m.group(1)], arg) for arg in argv[1:]]
    return [sys.executable, "-m", "locust", *swapped]


def free_tcp_port(avoid: int) -> int:
    """A TCP port the kernel gives on loopback, other than *avoid*."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port != avoid:
            return port


def test_documented_distributed_run(load_master, tmp_path: Path) -> None:
    require_locust()
    master_argv, *worker_argvs = documented_commands()
    assert "--master" in master_argv and len(worker_argvs) == 2 and all("--worker" in w for w in worker_argvs)
    port = free_port_for_tcp_and_udp()
    locust_port = free_tcp_port(avoid=port)
    server = load_master("workers.echo", "--bind", f"tcp://127.0.0.1:{port}", "--bind", f"udp://127.0.0.1:{port}",
                         workers=2)
    before = served(server)
    prefix = tmp_path / "distributed"
    reports = {"LOCUST_CSV": str(prefix), "LOCUST_HTML": f"{prefix}.html"}
    groups = [Group(local(argv, port, locust_port), ROOT, tmp_path / f"locust-{i}.log", env=reports)
              for i, argv in enumerate([master_argv, *worker_argvs])]
    try:
        try:
            code = groups[0].proc.wait(LOCUST_DEADLINE)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"locust master still running after {LOCUST_DEADLINE} s:\n{groups[0].log()}") from None
        log = groups[0].log()
        with open(f"{prefix}_stats.csv", newline="", encoding="utf-8") as file:
            rows = {row["Name"]: row for row in csv.DictReader(file)}
    finally:
        for group in groups:
            group.kill_group()
    assert code == 0, f"locust master exited with {code}:\n{log}"
    assert set(rows) == {"short", "datagram", "Aggregated"}, rows.keys()
    requests, failures = int(rows["Aggregated"]["Request Count"]), int(rows["Aggregated"]["Failure Count"])
    print(f"\ndistributed locust: {requests} requests, {failures} failures; short "
          f"{rows['short']['Request Count']}, datagram {rows['datagram']['Request Count']}")
    assert failures == 0, log
    assert all(int(rows[name]["Request Count"]) > 0 for name in ("short", "datagram")), rows
    # What locust counted, the master served: each short TCP request is one connection, each
    # datagram one request; a request in flight when the run stopped may be served uncounted.
    assert requests <= served(server) - before <= requests + USERS, (requests, served(server) - before)


def served(server: LoadMaster) -> int:
    """Requests the prefork master has served on all its listeners (status --json latency counts)."""
    return sum(int(listener["latency"]["count"]) for listener in server.status()["listeners"])
