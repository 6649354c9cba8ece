"""Smoke load: headless locust for 5 s against real masters (TCP echo, UDP echo, HTTP, WSGI).

Each test: zero failed requests, a minimum of requests, and every worker served some of them
(from `prefork status --json`, before and after the load); the balance is printed (`pytest -s`).
"""

from __future__ import annotations

import pytest

from tests.support import heavy

pytestmark = [pytest.mark.integration, heavy]

WORKERS = 2
USERS = 8
# Far below what a 2-core machine does in 5 s (thousands per second), far above a run that broke
# early: a run under this did not really load the master.
MIN_REQUESTS = 500


def check_run(master, before, run, what):
    """Zero failures, enough requests, every worker served: the assertions every test shares."""
    after = master.requests_by_worker()
    served = {pid: after[pid] - before.get(pid, 0) for pid in after}
    balance = ", ".join(f"pid {pid}: {count}" for pid, count in sorted(served.items()))
    print(f"\n{what}: {run.requests} requests, {run.failures} failures; per worker: {balance}")
    assert run.failures == 0, f"{run.failures} failed requests:\n{run.log}"
    assert run.returncode == 0, run.log
    assert run.requests >= MIN_REQUESTS, f"only {run.requests} requests in the run:\n{run.log}"
    assert set(served) == set(before), f"the workers changed during the load: {before} -> {after}"
    assert len(served) == WORKERS and all(count > 0 for count in served.values()), f"a worker served nothing: {served}"


def test_tcp_echo_short_and_persistent_connections(load_master, locust):
    master = load_master("workers.echo", "--bind", "tcp://127.0.0.1:0", "--bind", "udp://127.0.0.1:0",
                         workers=WORKERS)
    before = master.requests_by_worker()
    run = locust(master.listener("tcp://"), "TcpEchoUser", "TcpPersistentEchoUser", users=USERS)
    # A worker counts a connection as one request, so persistent users count once per connection.
    check_run(master, before, run, "TCP echo (connections)")
    assert {row["Name"] for row in run.stats} == {"short", "persistent", "Aggregated"}


def test_udp_echo(load_master, locust):
    master = load_master("workers.echo", "--bind", "tcp://127.0.0.1:0", "--bind", "udp://127.0.0.1:0",
                         workers=WORKERS)
    before = master.requests_by_worker()
    run = locust(master.listener("udp://"), "UdpEchoUser", users=USERS)
    check_run(master, before, run, "UDP echo (datagrams)")
    assert sum(master.requests_by_worker().values()) - sum(before.values()) >= run.requests


def test_http_keep_alive_and_close(load_master, locust):
    master = load_master("workers.http", "--bind", "tcp://127.0.0.1:0", workers=WORKERS)
    before = master.requests_by_worker()
    run = locust(master.listener("tcp://").replace("tcp://", "http://"), "HttpHealthUser", "HttpCloseUser",
                 users=USERS)
    check_run(master, before, run, "HTTP workers.http (connections)")


def test_wsgi_hello(load_master, locust):
    master = load_master("--wsgi", "workers.wsgi:hello", "--bind", "tcp://127.0.0.1:0", workers=WORKERS)
    before = master.requests_by_worker()
    run = locust(master.listener("tcp://").replace("tcp://", "http://"), "WsgiUser", "HttpCloseUser",
                 users=USERS)
    check_run(master, before, run, "HTTP --wsgi hello (connections)")
