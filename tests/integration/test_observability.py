"""Real masters: access log, error log, USR1 reopen, Prometheus metrics, read timeout."""

from __future__ import annotations

import json
import re
import signal
import socket
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import SOCKET_TIMEOUT, datagram_request, wait_until

pytestmark = pytest.mark.integration


def lines_of(path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_access_log_lines_with_byte_counts(start_master, tmp_path):
    access = tmp_path / "access.log"
    master = start_master(bind=["tcp://127.0.0.1:0", "udp://127.0.0.1:0"], workers=1, access_log=str(access))
    assert master.request(b"hello") == b"hello"
    assert datagram_request(master.address(1), b"ping") == b"ping"
    with pytest.raises(ConnectionError):
        master.request(b"raise")
    lines = wait_until(lambda: len(lines_of(access)) >= 3 and lines_of(access), message="no access lines")
    tcp, udp, failed = lines[:3]
    listener = master.info["listeners"]
    assert f" {listener[0]} " in tcp and re.search(r" in=6 out=6 ok$", tcp), tcp
    assert f" {listener[1]} " in udp and re.search(r" in=4 out=4 ok$", udp), udp
    assert failed.endswith(" error") and " 127.0.0.1:" in failed
    (pid,) = master.wait_workers(1)
    assert f"pid={pid}" in tcp


def test_access_log_json(start_master, tmp_path):
    access = tmp_path / "access.json"
    master = start_master(workers=1, access_log=str(access), log_format="json")
    assert master.request(b"abc") == b"abc"
    (line,) = wait_until(lambda: lines_of(access))
    record = json.loads(line)
    assert record["bytes_in"] == 4 and record["bytes_out"] == 4 and record["outcome"] == "ok"
    assert record["listener"] == master.info["listeners"][0] and record["duration_ms"] >= 0


def test_usr1_reopens_logs_in_master_and_workers(start_master, tmp_path):
    access, errors = tmp_path / "access.log", tmp_path / "error.log"
    master = start_master(workers=2, access_log=str(access), error_log=str(errors))
    assert master.request(b"before") == b"before"
    wait_until(lambda: lines_of(access))
    access.rename(tmp_path / "access.log.1")
    errors.rename(tmp_path / "error.log.1")
    master.signal(signal.SIGUSR1)
    # The reopen is asynchronous: keep asking until a request lands in the new file.
    wait_until(lambda: master.request(b"after") == b"after" and access.exists() and lines_of(access),
               message="the workers never reopened the access log")
    master.signal(signal.SIGTERM)
    master.wait_exit()
    assert "exiting" in errors.read_text(), "the master did not reopen the error log"
    assert all("before" not in line for line in lines_of(access))


def test_prometheus_metrics_from_their_own_process(start_master):
    master = start_master(workers=2, metrics_bind="tcp://127.0.0.1:0")
    url = wait_until(lambda: re.search(r"metrics on (http://\S+)", master.log()), message=master.log()).group(1)
    for _ in range(5):
        master.request(b"count me")
    families = {}

    def scrape():
        with urllib.request.urlopen(url, timeout=SOCKET_TIMEOUT) as response:
            families.update({f.name: f for f in text_string_to_metric_families(response.read().decode())})
        total = sum(s.value for s in families["prefork_requests"].samples if s.name.endswith("_total"))
        return total >= 5
    wait_until(scrape, message="requests not counted")
    assert {s.labels["state"]: s.value for s in families["prefork_workers"].samples}["idle"] == 2
    assert {s.labels["cause"] for s in families["prefork_worker_restarts"].samples} >= {"crash", "recycle"}
    metrics_pid = [p for p in _children(master.pid) if p not in master.worker_pids()]
    assert len(metrics_pid) == 1, "metrics are served by one process of their own"


def _children(pid: int) -> list[int]:
    import psutil

    return [child.pid for child in psutil.Process(pid).children()]


def test_read_timeout_frees_a_worker_held_by_a_silent_client(start_master):
    master = start_master(workers=1, read_timeout=0.5)
    with socket.create_connection(master.address(), timeout=SOCKET_TIMEOUT) as silent:
        silent.sendall(b"first\n")  # silent after its first line: its handler waits for the next
        wait_until(lambda: any(v.state_name == "busy" for v in master.workers()))
        assert master.request(b"served anyway") == b"served anyway"
        assert silent.recv(100) == b"first\n"
        assert silent.recv(100) == b"", "the silent connection was not closed"
