"""The prefork command against real masters it started (`python -m prefork run ...` in a session
of its own): the bundled services, status, and every control command waiting for its effect."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Iterator

import psutil
import pytest

from prefork.cli import main
from prefork.errors import EXIT_APP_LOAD, EXIT_BIND, EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from prefork.scoreboard import Scoreboard, SlotView
from tests.support import SOCKET_TIMEOUT, datagram_request, kill_process_group, wait_until

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
# How long a master started by a test gets to have all its workers accepting, or to exit.
START_TIMEOUT = 30.0


class CliMaster:
    """`python -m prefork run ARGS --pidfile DIR/master.pid`, run in DIR in a session of its own."""

    def __init__(self, directory: Path, args: list[str], run_dir: Path | None = None,
                 pythonpath: Path | None = None) -> None:
        """With *run_dir*, no --pidfile: the master picks its default one there (RUNTIME_DIRECTORY).
        *pythonpath* goes before the checkout (an app copy that another user can read)."""
        self.dir = directory
        self.pidfile = directory / "master.pid"
        self.log_path = directory / "master.log"
        self._log = open(self.log_path, "wb")
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFORK_")}
        env.update(PYTHONPATH=os.pathsep.join(str(p) for p in (pythonpath, ROOT) if p), PYTHONUNBUFFERED="1")
        pidfile_args = ["--pidfile", str(self.pidfile)]
        if run_dir is not None:
            env["RUNTIME_DIRECTORY"], pidfile_args = str(run_dir), []
        self.proc = subprocess.Popen([sys.executable, "-m", "prefork", "run", *args, *pidfile_args],
                                     cwd=directory, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        if run_dir is not None:
            self.pidfile = wait_until(lambda: self._own_pidfile(run_dir), START_TIMEOUT,
                                      message=f"no pidfile in {run_dir}:\n{self.log()}")

    def _own_pidfile(self, run_dir: Path) -> Path | None:
        if self.proc.poll() is not None:
            raise AssertionError(f"master exited with {self.proc.returncode}:\n{self.log()}")
        for path in run_dir.glob("*.pid"):
            if path.read_text().strip() == str(self.proc.pid):
                return path
        return None

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def workers(self) -> list[SlotView]:
        try:
            board = Scoreboard.open(f"{self.pidfile}.scoreboard")
        except (FileNotFoundError, ValueError):
            return []
        try:
            return board.used()
        finally:
            board.close()

    def ready(self, count: int, pid: int | None = None) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"master exited with {self.proc.returncode}:\n{self.log()}")
        workers = self.workers()
        return len(workers) == count and all(w.pid and w.state_name in ("idle", "busy") for w in workers)

    def wait_ready(self, count: int) -> CliMaster:
        wait_until(lambda: self.ready(count), START_TIMEOUT, message=f"{count} workers not ready:\n{self.log()}")
        return self

    def wait_exit(self) -> int:
        return self.proc.wait(START_TIMEOUT)

    def listening(self, pid: int | None = None) -> dict[str, list[Any]]:
        """The master's bound addresses by type ("tcp", "udp"): ports bound to 0 are resolved here."""
        found: dict[str, list[Any]] = {"tcp": [], "udp": []}
        for conn in psutil.Process(pid or self.proc.pid).net_connections(kind="inet"):
            if conn.type == socket.SOCK_DGRAM:
                found["udp"].append(tuple(conn.laddr))
            elif conn.status == psutil.CONN_LISTEN:
                found["tcp"].append(tuple(conn.laddr))
        return found

    def kill_group(self) -> None:
        """Teardown: TERM, then KILL, to everything in the master's process group (new masters too)."""
        kill_process_group(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.wait(10)
        self._log.close()


@pytest.fixture
def cli_master(tmp_path) -> Iterator[Any]:
    """cli_master(*run_args, workers=N) -> a CliMaster (ready unless workers=None); killed on teardown."""
    started: list[CliMaster] = []

    def start(*args: str, workers: int | None = 2, run_dir: Path | None = None,
              pythonpath: Path | None = None) -> CliMaster:
        directory = tmp_path / f"m{len(started)}"
        directory.mkdir(exist_ok=True)  # a test may have put an app there
        master = CliMaster(directory, list(args), run_dir, pythonpath)
        started.append(master)
        return master.wait_ready(workers) if workers is not None else master

    yield start
    for master in started:
        master.kill_group()


def prefork(capsys, *argv: str) -> tuple[int, str, str]:
    """A control command, run in this process (it neither forks nor keeps state)."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def tcp_line(address: Any, line: bytes) -> bytes:
    with socket.create_connection(address, timeout=SOCKET_TIMEOUT) as sock:
        sock.sendall(line + b"\n")
        sock.shutdown(socket.SHUT_WR)
        return sock.makefile("rb").readline().rstrip(b"\n")


def http_get(address: Any, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(*address, timeout=SOCKET_TIMEOUT)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


# -- the bundled services, as the README runs them ------------------------------------------------


def test_echo_on_tcp_and_udp_then_status_and_graceful_stop(cli_master, capsys):
    master = cli_master("workers.echo", "--bind", "tcp://127.0.0.1:0", "--bind", "udp://127.0.0.1:0",
                        "--workers", "2")
    bound = master.listening()
    assert tcp_line(bound["tcp"][0], b"hello") == b"hello"
    assert datagram_request(bound["udp"][0], b"ping") == b"ping"
    wait_until(lambda: sum(w.requests for w in master.workers()) >= 2, 10, message="requests not counted")

    code, out, _ = prefork(capsys, "status", "--pidfile", str(master.pidfile), "--json")
    report = json.loads(out)
    assert code == EXIT_OK and report["pidfile"] == str(master.pidfile)
    assert report["master"]["pid"] == master.proc.pid and "prefork: master [echo]" in report["master"]["title"]
    assert (report["master"]["generation"], report["master"]["target"], report["master"]["workers"]) == (1, 2, 2)
    rows = report["workers"]
    assert {row["pid"] for row in rows} == {p.pid for p in psutil.Process(master.proc.pid).children()}
    assert sum(row["requests"] for row in rows) >= 2
    for row in rows:
        assert row["state"] == "idle" and row["generation"] == 1 and row["request_age"] == 0
        assert row["rss"] > row["uss"] > 0 and row["cpu_percent"] >= 0 and row["uptime"] > 0

    code, out, _ = prefork(capsys, "status", "-p", str(master.pidfile))
    assert code == EXIT_OK and out.startswith(f"master {master.proc.pid}  ")
    assert len([line for line in out.splitlines() if line.endswith("s") and " idle " in line]) == 2

    code, out, _ = prefork(capsys, "stop", "-p", str(master.pidfile))
    assert (code, out) == (EXIT_OK, f"stopped: master {master.proc.pid}\n")
    assert master.proc.poll() == EXIT_OK and not master.pidfile.exists()


def test_http_with_a_root_service_option_in_thread_mode(cli_master, tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "hello.txt").write_text("static hello")
    master = cli_master("workers.http", "--bind", "tcp://127.0.0.1:0", "--mode", "thread", "--threads", "4",
                        "--root", str(tmp_path / "site"), "--workers", "1", workers=1)
    address = master.listening()["tcp"][0]
    assert http_get(address, "/health") == (200, b"ok")
    assert http_get(address, "/hello.txt") == (200, b"static hello")


def test_wsgi_app_from_the_current_directory(cli_master, tmp_path):
    (tmp_path / "m0").mkdir()
    (tmp_path / "m0" / "myapp.py").write_text(textwrap.dedent("""\
        def app(environ, start_response):
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"from myapp " + environ["PATH_INFO"].encode()]
        """))
    master = cli_master("--wsgi", "myapp:app", "--bind", "tcp://127.0.0.1:0", "--workers", "2")
    assert http_get(master.listening()["tcp"][0], "/x") == (200, b"from myapp /x")


def test_default_bind_comes_from_the_service_module(cli_master, tmp_path):
    (tmp_path / "m0").mkdir()
    (tmp_path / "m0" / "svc.py").write_text(textwrap.dedent("""\
        from prefork.handlers import StreamRequestHandler
        DEFAULT_BIND = ["tcp://127.0.0.1:0"]
        class StreamHandler(StreamRequestHandler):
            def handle(self):
                self.wfile.write(b"svc " + self.rfile.readline())
        """))
    master = cli_master("svc", "--workers", "1", workers=1)
    assert len(master.listening()["tcp"]) == 1
    assert tcp_line(master.listening()["tcp"][0], b"hi") == b"svc hi"


# -- failures of `prefork run` -----------------------------------------------------------------


def test_busy_port_exits_4_naming_the_address(cli_master):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        master = cli_master("workers.echo", "--bind", f"tcp://127.0.0.1:{port}", workers=None)
        assert master.wait_exit() == EXIT_BIND
    assert f"prefork: error: cannot listen on tcp://127.0.0.1:{port}: address already in use" in master.log()
    assert "Traceback" not in master.log()


def test_an_app_the_workers_cannot_load_exits_3(cli_master):
    master = cli_master("workers.echo:NoSuchHandler", "--bind", "tcp://127.0.0.1:0", "--workers", "1", workers=None)
    assert master.wait_exit() == EXIT_APP_LOAD
    assert "module 'workers.echo' has no attribute 'NoSuchHandler'" in master.log()


def test_an_unknown_service_option_exits_3_naming_it(cli_master):
    master = cli_master("workers.http", "--bind", "tcp://127.0.0.1:0", "--workers", "1", "--rot", "/srv",
                        workers=None)
    assert master.wait_exit() == EXIT_APP_LOAD
    assert "rot" in master.log().split("could not load the app", 1)[-1]


# -- control commands --------------------------------------------------------------------------


def test_reload_waits_for_a_new_generation_of_every_worker(cli_master, capsys):
    master = cli_master("tests.integration.apps", "--bind", "tcp://127.0.0.1:0", "--workers", "2")
    old = {w.pid for w in master.workers()}
    code, out, _ = prefork(capsys, "reload", "-p", str(master.pidfile))
    assert (code, out) == (EXIT_OK, f"reloaded: master {master.proc.pid} runs 2 workers of generation 2\n")
    workers = master.workers()  # right after the command returns: no wait needed
    assert [(w.generation, w.state_name) for w in workers] == [(2, "idle"), (2, "idle")]
    assert not old & {w.pid for w in workers}


def test_reload_reports_a_configuration_the_master_refuses(cli_master, capsys, tmp_path):
    (tmp_path / "m0").mkdir()
    config = tmp_path / "m0" / "prefork.toml"
    config.write_text("workers = 1\n")
    master = cli_master("tests.integration.apps", "-c", "prefork.toml", "--bind", "tcp://127.0.0.1:0", workers=1)
    config.write_text("workers = -1\n")
    code, _, err = prefork(capsys, "reload", "-p", str(master.pidfile))
    assert code == 2 and f"master {master.proc.pid} refused the reload" in err
    assert "setting 'workers': -1 is not allowed" in master.log()
    assert [w.generation for w in master.workers()] == [1]


def test_reload_reports_new_code_that_cannot_load(cli_master, capsys, tmp_path):
    (tmp_path / "m0").mkdir()
    app = tmp_path / "m0" / "svc.py"
    app.write_text("from tests.integration.apps import StreamHandler\n")
    master = cli_master("svc", "--bind", "tcp://127.0.0.1:0", "--workers", "1", workers=1)
    app.write_text("from tests.integration.apps import StreamHandler\nthis is not python\n")
    code, _, err = prefork(capsys, "reload", "-p", str(master.pidfile))
    assert code == EXIT_APP_LOAD and f"master {master.proc.pid} cancelled the reload" in err, (code, err, master.log())
    assert [(w.generation, w.state_name) for w in master.workers()] == [(1, "idle")]
    assert tcp_line(master.listening()["tcp"][0], b"still here") == b"still here"


def test_scale_sends_one_signal_at_a_time_and_waits(cli_master, capsys):
    master = cli_master("tests.integration.apps", "--bind", "tcp://127.0.0.1:0", "--workers", "1", workers=1)
    for count, expected in (("+2", 3), ("-1", 2), ("4", 4), ("1", 1)):
        code, out, _ = prefork(capsys, "scale", count, "-p", str(master.pidfile))
        assert code == EXIT_OK and out.startswith(f"scaled: master {master.proc.pid} runs {expected} worker")
        workers = master.workers()
        assert len(workers) == expected and all(w.state_name == "idle" for w in workers)
    assert master.log().count("SIGTTIN") == 2 + 2 and master.log().count("SIGTTOU") == 1 + 3
    code, _, err = prefork(capsys, "scale", "-1", "-p", str(master.pidfile))
    assert code == 2 and "scale: '-1' would make 0 workers (now 1); allowed: 1 to 1023" in err


def test_upgrade_hands_over_to_a_new_master_on_the_same_port(cli_master, capsys):
    master = cli_master("tests.integration.apps", "--bind", "tcp://127.0.0.1:0", "--workers", "2")
    address = master.listening()["tcp"][0]
    old_pid = master.proc.pid
    code, out, _ = prefork(capsys, "upgrade", "-p", str(master.pidfile))
    new_pid = int(master.pidfile.read_text())
    assert code == EXIT_OK and new_pid != old_pid
    assert out.startswith(f"upgraded: master {new_pid} runs 2 workers; master {old_pid} is stopping")
    assert master.wait_exit() == EXIT_OK  # the old master leaves on its own
    assert master.listening(new_pid)["tcp"] == [address]
    served_by = int(tcp_line(address, b"pid"))
    assert psutil.Process(served_by).ppid() == new_pid
    code, out, _ = prefork(capsys, "stop", "--fast", "-p", str(master.pidfile))
    assert (code, out) == (EXIT_OK, f"stopped: master {new_pid}\n")
    assert not psutil.pid_exists(new_pid) or psutil.Process(new_pid).status() == psutil.STATUS_ZOMBIE


def test_reopen_logs_signals_the_master(cli_master, capsys):
    master = cli_master("tests.integration.apps", "--bind", "tcp://127.0.0.1:0", "--workers", "1",
                        "--error-log", "error.log", workers=1)
    log_file = master.dir / "error.log"
    wait_until(lambda: log_file.exists() and "ready" in log_file.read_text(), 10, message="no error log")
    os.rename(log_file, master.dir / "error.log.1")
    code, out, _ = prefork(capsys, "reopen-logs", "-p", str(master.pidfile))
    assert (code, out) == (EXIT_OK, f"sent SIGUSR1: master {master.proc.pid} and its workers reopen their log files\n")
    wait_until(lambda: "SIGUSR1" in (master.dir / "error.log.1").read_text()
               or log_file.exists() and "SIGUSR1" in log_file.read_text(), 10,
               message=f"the master did not log SIGUSR1:\n{master.log()}")


# -- the default pidfile: control commands without flags ------------------------------------------


@pytest.fixture
def run_dir(tmp_path, monkeypatch) -> Path:
    """The directory of default pidfiles, for the masters and the in-process CLI alike."""
    directory = tmp_path / "run"
    directory.mkdir(mode=0o755)
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(directory))
    return directory


def test_without_a_pidfile_status_and_stop_find_the_master(cli_master, capsys, run_dir):
    master = cli_master("workers.echo", "--bind", "tcp://127.0.0.1:0", "-w", "1", workers=1, run_dir=run_dir)
    assert master.pidfile == run_dir / "echo.pid"
    code, out, err = prefork(capsys, "status", "--json")
    assert (code, err) == (EXIT_OK, "")
    assert json.loads(out)["master"]["pid"] == master.proc.pid and json.loads(out)["pidfile"] == str(master.pidfile)
    assert prefork(capsys, "stop")[:2] == (EXIT_OK, f"stopped: master {master.proc.pid}\n")
    assert master.wait_exit() == EXIT_OK
    assert list(run_dir.iterdir()) == []  # pidfile and scoreboard removed on stop


def test_with_several_masters_the_command_lists_them_and_takes_a_name(cli_master, capsys, run_dir):
    echo = cli_master("workers.echo", "--bind", "tcp://127.0.0.1:0", "-w", "1", workers=1, run_dir=run_dir)
    again = cli_master("workers.echo", "--bind", "tcp://127.0.0.1:0", "-w", "1", workers=1, run_dir=run_dir)
    http = cli_master("workers.http", "--bind", "tcp://127.0.0.1:0", "-w", "1", workers=1, run_dir=run_dir)
    assert (echo.pidfile.name, again.pidfile.name, http.pidfile.name) == ("echo.pid", "echo@2.pid", "http.pid")
    for master in (echo, again, http):
        code, out, err = prefork(capsys, "status")
    assert (code, out) == (EXIT_USAGE, "")
    assert "3 masters are running; choose one with --name NAME or --pidfile FILE" in err
    for service, master in (("echo", echo), ("echo", again), ("http", http)):
        assert f"  {service}  pid {master.proc.pid}  {master.pidfile}\n" in err
    code, out, err = prefork(capsys, "status", "--name", "echo")
    assert code == EXIT_USAGE and "2 masters are running" in err
    code, out, err = prefork(capsys, "status", "--json", "--name", "http")
    assert (code, json.loads(out)["master"]["pid"]) == (EXIT_OK, http.proc.pid)
    assert prefork(capsys, "stop", "-n", "http")[:2] == (EXIT_OK, f"stopped: master {http.proc.pid}\n")


def test_a_stale_default_pidfile_is_skipped(cli_master, capsys, run_dir):
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait(START_TIMEOUT)
    (run_dir / "echo.pid").write_text(f"{dead.pid}\n")  # a master killed with SIGKILL left it
    (run_dir / "gone.pid").write_text(f"{dead.pid}\n")
    code, _, err = prefork(capsys, "status")
    assert code == EXIT_FAILURE and f"no master running: no live pidfile in {run_dir}" in err
    master = cli_master("workers.echo", "--bind", "tcp://127.0.0.1:0", "-w", "1", workers=1, run_dir=run_dir)
    assert master.pidfile == run_dir / "echo.pid"  # the stale file is replaced
    code, out, _ = prefork(capsys, "status", "--json")
    assert (code, json.loads(out)["master"]["pid"]) == (EXIT_OK, master.proc.pid)
