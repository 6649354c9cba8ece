"""Real masters seen live: listen-queue depth against ss, status --json against the metrics, prefork top."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from prefork.errors import EXIT_OK, EXIT_UNHEALTHY
from prefork.scoreboard import LOOP_STALLED
from tests.integration.conftest import ROOT
from tests.support import SOCKET_TIMEOUT, datagram_request, require_tool, wait_until

pytestmark = pytest.mark.integration

# How long a `prefork` command of a test may take.
COMMAND_TIMEOUT = 20.0


def prefork(master: Any, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m prefork ARGS -p PIDFILE`, as an operator runs it."""
    return subprocess.run([sys.executable, "-m", "prefork", *args, "-p", str(master.pidfile)], cwd=ROOT,
                          capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False)


def status(master: Any) -> dict[str, Any]:
    done = prefork(master, "status", "--json")
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def metrics_url(master: Any) -> str:
    found = wait_until(lambda: re.search(r"metrics on (http://\S+)", master.log()), message=master.log())
    return str(found.group(1))


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(url, timeout=SOCKET_TIMEOUT) as response:
        text = response.read().decode()
    return {(sample.name, frozenset((k, v) for k, v in sample.labels.items() if k != "service")): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def samples_named(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: value for (sample, labels), value in samples.items() if sample == name}


def ss_recv_q(args: list[str], local: str) -> int | None:
    """Recv-Q of the listening socket whose local address is *local*, as `ss ARGS` prints it."""
    out = subprocess.run(["ss", *args], capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=True).stdout
    rows = [line.split() for line in out.splitlines() if "LISTEN" in line]
    found = [int(row[row.index("LISTEN") + 1]) for row in rows if local in row]
    return found[0] if len(found) == 1 else None


def test_listen_queue_depth_is_the_kernels(start_master, tmp_path):
    require_tool("ss")
    path = tmp_path / "q.sock"
    master = start_master(bind=["tcp://127.0.0.1:0", f"unix:{path}"], workers=1, metrics_bind="tcp://127.0.0.1:0")
    url, port = metrics_url(master), master.address()[1]
    kernel = {master.info["listeners"][0]: lambda: ss_recv_q(["-lnt", f"sport = :{port}"], f"127.0.0.1:{port}"),
              master.info["listeners"][1]: lambda: ss_recv_q(["-lxn"], str(path))}
    (worker,) = master.wait_workers(1)
    clients = []
    os.kill(worker, signal.SIGSTOP)  # nobody accepts: the connections stay in the backlogs
    try:
        for family, address, count in ((socket.AF_INET, master.address(0), 5), (socket.AF_UNIX, str(path), 3)):
            for _ in range(count):
                client = socket.socket(family, socket.SOCK_STREAM)
                clients.append(client)
                client.settimeout(SOCKET_TIMEOUT)
                client.connect(address)
                client.sendall(b"queued\n")  # data: a TCP_DEFER_ACCEPT listener queues it at once
        wait_until(lambda: [ss() for ss in kernel.values()] == [5, 3], message="ss never showed 5 and 3 queued")

        def gauges() -> dict[str, float]:
            found = samples_named(scrape(url), "prefork_listen_queue_depth")
            return {dict(labels)["listener"]: value for labels, value in found.items()}
        wait_until(lambda: gauges() == {name: ss() for name, ss in kernel.items()},
                   message="the gauges never showed what ss shows: 5 and 3")
        assert [row["queue_depth"] for row in status(master)["listeners"]] == [5, 3]
    finally:
        os.kill(worker, signal.SIGCONT)
        for client in clients:
            client.close()
    wait_until(lambda: [row["queue_depth"] for row in status(master)["listeners"]] == [0, 0])


@pytest.mark.parametrize("mode, app", [("sync", "tests.integration.apps"), ("asyncio", "tests.integration.aio_apps")],
                         ids=["sync", "asyncio"])  # asyncio (issue 15): each request of the load is a connection
def test_status_and_metrics_agree_under_load(start_master, load, mode, app):
    master = start_master(app=app, mode=mode, workers=2, metrics_bind="tcp://127.0.0.1:0")
    url, tcp = metrics_url(master), master.info["listeners"][0]
    running = load(master, clients=3)
    running.wait_requests(50)
    before, samples, after = status(master), scrape(url), status(master)  # under load: metrics between two
    count = samples_named(samples, "prefork_request_duration_seconds_count")[frozenset({("listener", tcp)})]
    assert before["listeners"][0]["latency"]["count"] <= count <= after["listeners"][0]["latency"]["count"]
    by_number = _requests_by_number(samples)
    for row_before, row_after in zip(before["workers"], after["workers"]):
        assert row_before["number"] == row_after["number"]
        assert row_before["requests"] <= by_number[row_before["number"]] <= row_after["requests"]
    running.stop()
    assert not running.failures, running.failures[:5]
    wait_until(lambda: all(w.state_name == "idle" for w in master.workers()))
    quiet, samples = status(master), scrape(url)  # at rest: equal, figure for figure
    listener = quiet["listeners"][0]
    histogram = {name: samples_named(samples, f"prefork_request_duration_seconds_{name}")[frozenset({("listener", tcp)})]
                 for name in ("count", "sum")}
    assert listener["latency"]["count"] == histogram["count"] == listener["requests"] >= running.ok
    assert listener["latency"]["sum"] == pytest.approx(histogram["sum"], abs=1e-6)
    assert _requests_by_number(samples) == {w["number"]: w["requests"] for w in quiet["workers"]}
    workers = samples_named(samples, "prefork_workers")
    assert workers[frozenset({("state", "idle")})] == len(quiet["workers"]) == quiet["master"]["target"] == 2
    assert samples[("prefork_generation", frozenset())] == quiet["master"]["generation"]


def _requests_by_number(samples: dict[tuple[str, frozenset[tuple[str, str]]], float]) -> dict[int, float]:
    totals: dict[int, float] = {}
    for labels, value in samples_named(samples, "prefork_requests_total").items():
        number = int(dict(labels)["worker"])
        totals[number] = totals.get(number, 0) + value
    return totals


def tmux(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False)


def rows_of(screen: str, pids: set[int]) -> dict[int, list[str]]:
    """The worker rows of a top frame, by pid (the second column)."""
    rows = {}
    for line in screen.splitlines():
        cells = line.split()
        if len(cells) > 5 and cells[1].isdigit() and int(cells[1]) in pids:
            rows[int(cells[1])] = cells
    return rows


def test_top_in_a_terminal_under_load(start_master, load, tmp_path):
    require_tool("tmux")
    master = start_master(workers=2)
    pids = master.wait_workers(2)
    running = load(master, clients=2)
    session = f"prefork-top-{os.getpid()}"
    socket_name = str(tmp_path / "tmux.sock")  # a tmux server of its own, never the user's
    command = f"{sys.executable} -m prefork top -p {master.pidfile}"
    started = tmux("-S", socket_name, "new-session", "-d", "-s", session, "-x", "150", "-y", "30", "-c", str(ROOT),
                   command)
    assert started.returncode == 0, started.stderr
    try:
        def screen() -> str:
            return tmux("-S", socket_name, "capture-pane", "-p", "-t", session).stdout

        def busy_rows() -> dict[int, list[str]]:
            rows = rows_of(screen(), pids)
            return rows if set(rows) == pids and all(r[4] != "-" and float(r[4]) > 0 for r in rows.values()) else {}

        rows = wait_until(busy_rows, 20, message=f"no rows with requests/s for {pids}:\n{screen()}")
        assert all(row[3] in ("idle", "busy") for row in rows.values()), rows
        assert f"master {master.pid}  generation 1  workers 2 serving of 2 target" in screen()
        assert re.search(r"tcp://127\.0\.0\.1:\d+: queue \d+  \d+ requests  p50 [\d.]+ ms", screen()), screen()
        assert "sorted by number" in screen()
        tmux("-S", socket_name, "send-keys", "-t", session, "c")
        wait_until(lambda: "sorted by cpu" in screen(), message=screen())
        tmux("-S", socket_name, "send-keys", "-t", session, "q")
        wait_until(lambda: tmux("-S", socket_name, "has-session", "-t", session).returncode != 0,
                   message=f"q did not quit top:\n{screen()}")
    finally:
        tmux("-S", socket_name, "kill-session", "-t", session)
        running.stop()


def test_top_prints_plain_frames_when_not_a_terminal(start_master):
    master = start_master(workers=2)
    pids = master.wait_workers(2)
    master.request(b"one")
    done = prefork(master, "top", "--iterations", "2", "--sort", "m")
    assert done.returncode == 0, done.stderr
    frames = re.split(r"(?m)^(?=master \d+ )", done.stdout)[1:]
    assert len(frames) == 2 and all("sorted by rss" in frame for frame in frames), done.stdout
    assert all(set(rows_of(frame, pids)) == pids for frame in frames), done.stdout
    assert "\x1b" not in done.stdout, "escape sequences on a pipe"
    assert all(row[4] == "0.0" for row in rows_of(frames[1], pids).values())  # idle: 0 requests/s


def test_status_calls_a_stalled_event_loop_by_its_name_and_the_pool_unhealthy(start_master):
    """A loop blocked while idle, and no timeout to abort it: status must not call it serving."""
    master = start_master(app="tests.integration.aio_apps:block_later", mode="asyncio", workers=1, timeout=0,
                          bind=["udp://127.0.0.1:0"])
    (pid,) = master.wait_workers(1)
    before = prefork(master, "status", "--json", "--grace", "1")
    assert before.returncode == EXIT_OK, before.stdout
    assert json.loads(before.stdout)["workers"][0]["state"] == "idle"
    assert datagram_request(master.address(), b"block 3600") == b"scheduled"
    wait_until(lambda: any(v.pid == pid and v.loop_stalled(time.monotonic()) > LOOP_STALLED + 0.5
                           for v in master.workers()), 15, message=str(master.workers()))
    done = prefork(master, "status", "--json", "--grace", "1")
    assert done.returncode == EXIT_UNHEALTHY, done.stdout
    report = json.loads(done.stdout)
    (worker,) = report["workers"]
    assert (worker["pid"], worker["state"]) == (pid, "stalled") and worker["loop_stalled"] > LOOP_STALLED, worker
    assert worker["request_age"] == pytest.approx(worker["loop_stalled"], abs=0.5)
    assert report["health"]["serving"] == 0
    assert any(re.fullmatch(rf"worker 1 \(pid {pid}\): its event loop has not turned for \d+ s, so it serves nothing",
                            problem) for problem in report["health"]["problems"]), report["health"]
    text = prefork(master, "status", "--grace", "1")
    assert text.returncode == EXIT_UNHEALTHY and "stalled" in text.stdout and "0 of 1 workers serving" in text.stdout
