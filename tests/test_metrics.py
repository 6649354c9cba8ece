"""prefork.metrics: a real scoreboard, the metrics process forked for real, scraped over loopback."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import select
import signal
import socket
import urllib.request
from pathlib import Path
from typing import Iterator

import psutil
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from prefork import metrics
from prefork.errors import ConfigError, ListenerError
from prefork.procstats import ProcStats
from prefork.scoreboard import MAX_LISTENERS, Scoreboard
from tests.support import SOCKET_TIMEOUT, wait_until

LISTENERS = ["tcp://127.0.0.1:9000", "udp://127.0.0.1:9000"]
SERVICE = "echo"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of an exposition, keyed by (sample name, labels without `service`)."""
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = dict(sample.labels)
            assert labels.pop("service") == SERVICE, sample
            found[sample.name, frozenset(labels.items())] = sample.value
    return found


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[name, frozenset(labels.items())]


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


def scrape(port: int, path: str = "/metrics") -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=SOCKET_TIMEOUT) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return parse(response.read().decode())


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


# -- a scoreboard as a master and its workers would leave it ----------------------------------


@pytest.fixture
def board_path(tmp_path: Path) -> Iterator[str]:
    """A scoreboard with four workers: idle, busy, booting, and an exiting predecessor of worker 1."""
    path = str(tmp_path / "prefork.scoreboard")
    board = Scoreboard.create(4, path)
    gone = dead_pid()
    fill_board(board, live_pid=os.getpid(), gone_pid=gone)
    yield path
    board.close()


def fill_board(board: Scoreboard, live_pid: int, gone_pid: int) -> None:
    serve(board, 0, number=1, generation=2, pid=live_pid, per_listener=[3, 2])
    serve(board, 1, number=2, generation=2, pid=gone_pid, per_listener=[1, 0])
    board.writer(1).begin(b"127.0.0.1:5555", LISTENERS[0].encode())  # busy on its next request
    board.claim(2, 3, 2)  # booting: no pid yet
    serve(board, 3, number=1, generation=1, pid=gone_pid, per_listener=[4, 0])
    board.writer(3).exiting()  # being replaced by the worker in slot 0, which took its number
    board.publish(2, 3, {"exit": 1, "timeout": 2, "recycle": 3, "crash": 4})


def serve(board: Scoreboard, index: int, number: int, generation: int, pid: int, per_listener: list[int]) -> None:
    board.claim(index, number, generation)
    board.set_pid(index, pid)
    writer = board.writer(index)
    writer.booted(pid)
    for listener_index, count in enumerate(per_listener):
        for _ in range(count):
            writer.begin(b"127.0.0.1:5555", LISTENERS[listener_index].encode())
            writer.end(listener_index)


# -- the metrics process ----------------------------------------------------------------------


@dataclasses.dataclass
class MetricsProcess:
    pid: int
    port: int


@contextlib.contextmanager
def metrics_process(board_path: str, bind: str = "tcp://127.0.0.1:0") -> Iterator[MetricsProcess]:
    """Fork a process that runs metrics.run(); yields its pid and bound port; kills it at the end."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        _run_child(read_fd, write_fd, board_path, bind)
    os.close(write_fd)
    try:
        yield MetricsProcess(pid, int(read_message(read_fd)))
    finally:
        os.close(read_fd)
        stop(pid)


def _run_child(read_fd: int, write_fd: int, board_path: str, bind: str) -> None:
    status = 1
    try:
        os.close(read_fd)
        metrics.run(bind, board_path, LISTENERS, SERVICE,
                    ready=lambda address: os.write(write_fd, f"{address[1]}\n".encode()))
        status = 0
    finally:
        os._exit(status)


def read_message(fd: int) -> str:
    """One line from *fd*, within the socket timeout; the child wrote it once ready."""
    ready, _, _ = select.select([fd], [], [], SOCKET_TIMEOUT)
    assert ready, "the metrics process did not become ready in time"
    message = os.read(fd, 128).decode()
    assert message.endswith("\n"), f"the metrics process failed before it was ready: {message!r}"
    return message.strip()


def exit_code(pid: int) -> int | None:
    """The exit code of child *pid* if it has exited (reaping it), else None."""
    waited, status = os.waitpid(pid, os.WNOHANG)
    return os.waitstatus_to_exitcode(status) if waited else None


def stop(pid: int) -> None:
    """Make sure child *pid* is gone and reaped."""
    with contextlib.suppress(ChildProcessError):  # already reaped by the test
        if exit_code(pid) is None:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


# -- tests ------------------------------------------------------------------------------------


def test_scrape_reports_the_scoreboard(board_path: str) -> None:
    with metrics_process(board_path) as process:
        samples = scrape(process.port)

    assert value(samples, "prefork_up") == 1
    requests = {(dict(labels)["worker"], dict(labels)["listener"]): v
                for (name, labels), v in samples.items() if name == "prefork_requests_total"}
    # Worker 1's outgoing predecessor (4 requests) and its successor (3 + 2) are summed.
    assert requests == {("1", LISTENERS[0]): 7, ("1", LISTENERS[1]): 2, ("2", LISTENERS[0]): 1,
                        ("2", LISTENERS[1]): 0, ("3", LISTENERS[0]): 0, ("3", LISTENERS[1]): 0}
    assert {state: value(samples, "prefork_workers", state=state)
            for state in ("booting", "idle", "busy", "exiting")} == {"booting": 1, "idle": 1, "busy": 1,
                                                                      "exiting": 1}
    assert value(samples, "prefork_busy_workers") == 1
    assert {cause: value(samples, "prefork_worker_restarts_total", cause=cause)
            for cause in ("exit", "timeout", "recycle", "crash")} == {"exit": 1, "timeout": 2, "recycle": 3,
                                                                       "crash": 4}
    assert value(samples, "prefork_pool_target_workers") == 3
    assert value(samples, "prefork_generation") == 2


def test_memory_is_read_for_live_workers_only(board_path: str) -> None:
    with metrics_process(board_path) as process:
        samples = scrape(process.port)
    own_rss = psutil.Process().memory_info().rss

    memory = {dict(labels)["worker"]: dict(labels)["kind"]
              for (name, labels), _ in samples.items() if name == "prefork_worker_memory_bytes"}
    assert set(memory) == {"1"}  # worker 2's pid is gone, worker 3 has none yet
    # Worker 1 is this test process: the metrics process read our memory.
    rss = value(samples, "prefork_worker_memory_bytes", worker="1", kind="rss")
    assert rss == pytest.approx(own_rss, rel=0.2)
    # Our unique pages: fewer than resident ones, and fewer still while the forked metrics
    # process shared them, so only bounds can be checked.
    assert 0 < value(samples, "prefork_worker_memory_bytes", worker="1", kind="uss") < rss
    assert value(samples, "prefork_worker_cpu_seconds_total", worker="1") > 0


def test_every_scrape_reads_the_scoreboard_anew(board_path: str) -> None:
    with metrics_process(board_path) as process:
        assert value(scrape(process.port), "prefork_generation") == 2

        # An upgrade: the new master's scoreboard replaces the file at the same path.
        new = Scoreboard.create(2, board_path)
        try:
            serve(new, 0, number=1, generation=7, pid=os.getpid(), per_listener=[0, 5])
            new.publish(7, 1, {"crash": 9})
            samples = scrape(process.port)
        finally:
            new.close()
    assert value(samples, "prefork_generation") == 7
    assert value(samples, "prefork_pool_target_workers") == 1
    assert value(samples, "prefork_requests_total", worker="1", listener=LISTENERS[1]) == 5
    assert value(samples, "prefork_worker_restarts_total", cause="crash") == 9
    assert value(samples, "prefork_workers", state="idle") == 1
    assert value(samples, "prefork_workers", state="busy") == 0


def test_live_counts_between_scrapes(tmp_path: Path) -> None:
    board_path = str(tmp_path / "scoreboard")
    board = Scoreboard.create(1, board_path)
    try:
        serve(board, 0, number=1, generation=1, pid=os.getpid(), per_listener=[1])
        with metrics_process(board_path) as process:
            before = value(scrape(process.port), "prefork_requests_total", worker="1", listener=LISTENERS[0])
            writer = board.writer(0)
            for _ in range(41):
                writer.begin(b"127.0.0.1:1", LISTENERS[0].encode())
                writer.end(0)
            del writer
            after = value(scrape(process.port), "prefork_requests_total", worker="1", listener=LISTENERS[0])
    finally:
        board.close()
    assert (before, after) == (1, 42)


def test_unreadable_scoreboard_reports_down(board_path: str) -> None:
    with metrics_process(board_path) as process:
        os.unlink(board_path)
        samples = scrape(process.port)
    assert samples == {("prefork_up", frozenset()): 0}


def test_sigterm_stops_it_cleanly(board_path: str) -> None:
    with metrics_process(board_path) as process:
        scrape(process.port)
        os.kill(process.pid, signal.SIGTERM)
        code = wait_for_exit(process.pid, timeout=5.0)
        with socket.socket() as sock, pytest.raises(ConnectionRefusedError):
            sock.settimeout(SOCKET_TIMEOUT)
            sock.connect(("127.0.0.1", process.port))
    assert code == 0  # run() returned, and the child went on to os._exit(0)


def wait_for_exit(pid: int, timeout: float) -> int:
    codes: list[int | None] = []

    def exited() -> bool:
        codes.append(exit_code(pid))
        return codes[-1] is not None

    wait_until(exited, timeout=timeout, message=f"process {pid} did not exit within {timeout}s")
    return codes[-1]  # type: ignore[return-value]


def test_usr1_does_not_stop_it(board_path: str) -> None:
    with metrics_process(board_path) as process:
        os.kill(process.pid, signal.SIGUSR1)
        assert value(scrape(process.port), "prefork_up") == 1
        assert exit_code(process.pid) is None


def test_leaves_when_its_parent_is_gone(board_path: str) -> None:
    """The metrics process of a master that died (SIGKILL) does not stay behind holding the port."""
    report_read, report_write = os.pipe()
    go_read, go_write = os.pipe()
    parent = os.fork()
    if parent == 0:  # pragma: no cover - the stand-in master: forks the metrics process, then dies
        try:
            os.close(report_read)
            os.close(go_write)
            with metrics_process(board_path) as process:
                os.write(report_write, f"{process.pid} {process.port}\n".encode())
                os.read(go_read, 1)  # until the test closes its end
                os._exit(0)  # leaves without stopping the metrics process
        finally:
            os._exit(1)
    os.close(report_write)
    os.close(go_read)
    pid, port = map(int, read_message(report_read).split())
    try:
        os.close(go_write)  # the stand-in master leaves without stopping its child
        os.waitpid(parent, 0)
        wait_until(lambda: not _running(pid), timeout=metrics.PARENT_CHECK_INTERVAL + 5.0,
                   message="the metrics process outlived its parent")
    finally:
        os.close(report_read)
        if _running(pid):
            os.kill(pid, signal.SIGKILL)


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_bind_must_be_tcp(board_path: str) -> None:
    with pytest.raises(ConfigError, match="metrics_bind"):
        metrics.run("udp://127.0.0.1:0", board_path, LISTENERS, SERVICE)


def test_port_in_use_is_a_listener_error(board_path: str) -> None:
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ListenerError, match=f"127.0.0.1:{port}"):
            metrics.run(f"tcp://127.0.0.1:{port}", board_path, LISTENERS, SERVICE)
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == mask  # run() put the signal mask back


# -- the collector alone ----------------------------------------------------------------------


def collect(collector: metrics.ScoreboardCollector) -> Samples:
    registry = CollectorRegistry()
    registry.register(collector)
    return parse(generate_latest(registry).decode())


def fake_stats(table: dict[int, tuple[int, int | None]]) -> metrics.StatsReader:
    def read(pid: int) -> ProcStats | None:
        if pid not in table:
            return None
        rss, uss = table[pid]
        return ProcStats(pid, rss, uss, None, 1.5, 0.0, None)
    return read


def test_processes_sharing_a_number_are_summed(tmp_path: Path) -> None:
    path = str(tmp_path / "scoreboard")
    board = Scoreboard.create(3, path)
    try:
        serve(board, 0, number=1, generation=1, pid=1001, per_listener=[1])
        serve(board, 1, number=1, generation=2, pid=1002, per_listener=[2])
        serve(board, 2, number=2, generation=2, pid=1003, per_listener=[0])
        memory = fake_stats({1001: (100, 10), 1002: (200, None), 1003: (300, 30)})
        samples = collect(metrics.ScoreboardCollector(path, LISTENERS[:1], SERVICE, stats_of=memory))
    finally:
        board.close()
    assert value(samples, "prefork_worker_memory_bytes", worker="1", kind="rss") == 300
    assert value(samples, "prefork_worker_memory_bytes", worker="1", kind="uss") == 10  # only one was readable
    assert value(samples, "prefork_worker_memory_bytes", worker="2", kind="uss") == 30
    assert value(samples, "prefork_worker_cpu_seconds_total", worker="1") == 3.0
    assert value(samples, "prefork_requests_total", worker="1", listener=LISTENERS[0]) == 3


def test_listeners_beyond_the_counters_are_other(tmp_path: Path) -> None:
    path = str(tmp_path / "scoreboard")
    board = Scoreboard.create(1, path)
    many = [f"tcp://127.0.0.1:{9000 + i}" for i in range(MAX_LISTENERS + 2)]
    try:
        board.claim(0, 1, 1)
        writer = board.writer(0)
        for index in (0, MAX_LISTENERS - 1, MAX_LISTENERS, MAX_LISTENERS + 1):
            writer.begin(b"c", b"l")
            writer.end(index)
        del writer
        samples = collect(metrics.ScoreboardCollector(path, many, SERVICE, stats_of=fake_stats({})))
    finally:
        board.close()
    listeners = {dict(labels)["listener"]: v for (name, labels), v in samples.items()
                 if name == "prefork_requests_total"}
    assert listeners == {**{name: 0 for name in many[1:MAX_LISTENERS - 1]}, many[0]: 1, "other": 3}


def test_describe_names_every_family(tmp_path: Path) -> None:
    collector = metrics.ScoreboardCollector(str(tmp_path / "none"), LISTENERS, SERVICE)
    described = {family.name for family in collector.describe()}
    assert described == {"prefork_up", "prefork_requests", "prefork_workers", "prefork_busy_workers",
                         "prefork_worker_memory_bytes", "prefork_worker_cpu_seconds", "prefork_worker_restarts",
                         "prefork_pool_target_workers", "prefork_generation", "prefork_request_duration_seconds",
                         "prefork_listen_queue_depth"}


def test_latency_histogram_is_cumulative_and_outlives_workers(tmp_path: Path) -> None:
    path = str(tmp_path / "scoreboard")
    board = Scoreboard.create(2, path)
    try:
        board.claim(0, 1, 1)
        board.claim(1, 2, 1)
        for index, seconds in ((0, 0.0002), (0, 0.003), (1, 0.003), (1, 20.0)):
            board.writer(index).observe(0, seconds)
        board.writer(1).observe(1, 0.02)
        board.release(0)  # worker 1 leaves: its request stays counted
        board.publish_listeners(LISTENERS, [4, -1])
        samples = collect(metrics.ScoreboardCollector(path, LISTENERS, SERVICE, stats_of=fake_stats({})))
    finally:
        board.close()
    tcp = {"listener": LISTENERS[0]}
    assert value(samples, "prefork_request_duration_seconds_bucket", le="0.0005", **tcp) == 1
    assert value(samples, "prefork_request_duration_seconds_bucket", le="0.005", **tcp) == 3
    assert value(samples, "prefork_request_duration_seconds_bucket", le="10.0", **tcp) == 3
    assert value(samples, "prefork_request_duration_seconds_bucket", le="+Inf", **tcp) == 4
    assert value(samples, "prefork_request_duration_seconds_count", **tcp) == 4
    assert value(samples, "prefork_request_duration_seconds_sum", **tcp) == pytest.approx(20.0062)
    assert value(samples, "prefork_request_duration_seconds_count", listener=LISTENERS[1]) == 1
    assert value(samples, "prefork_listen_queue_depth", listener=LISTENERS[0]) == 4
    assert ("prefork_listen_queue_depth", frozenset({("listener", LISTENERS[1])})) not in samples  # unknown
