"""A reload is the whole new configuration (README "Reload"): real masters started by the CLI
with a config file, which each test rewrites before `prefork reload`."""

from __future__ import annotations

import re
import socket
import threading
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from prefork.errors import EXIT_APP_LOAD, EXIT_BIND, EXIT_NOT_APPLIED, EXIT_OK, EXIT_USAGE
from tests.integration.test_cli import cli_master, prefork, tcp_line  # noqa: F401 (a fixture)
from tests.integration.test_master import free_port_for_tcp_and_udp as free_port
from tests.support import SOCKET_TIMEOUT, datagram_request, wait_until

pytestmark = pytest.mark.integration

APP = "tests.integration.apps"


class Config:
    """The master's config file, in the directory it runs in."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(exist_ok=True)
        self.path = directory / "prefork.toml"

    def write(self, **settings: Any) -> None:
        lines = []
        for key, value in settings.items():
            if isinstance(value, list):
                text = "[" + ", ".join(f'"{item}"' for item in value) + "]"
            elif isinstance(value, str):
                text = f'"{value}"'
            else:
                text = str(value).lower() if isinstance(value, bool) else str(value)
            lines.append(f"{key} = {text}")
        self.path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def configured(cli_master, tmp_path):
    """configured(**settings) -> (master, config): a master reading its settings from a file."""
    def start(workers: int = 2, app: str = APP, pythonpath: Path | None = None, **settings: Any) -> tuple[Any, Config]:
        config = Config(tmp_path / "m0")
        config.write(workers=workers, **settings)
        return cli_master(app, "-c", "prefork.toml", workers=workers, pythonpath=pythonpath), config
    return start


def reload(capsys, master: Any) -> tuple[int, str, str]:
    return prefork(capsys, "reload", "-p", str(master.pidfile), "--timeout", "30")


def line(address: Any, text: bytes) -> bytes:
    return tcp_line(address, text)


def test_a_reload_applies_new_listeners_workers_and_loglevel_and_says_so(configured, capsys):
    port = free_port()
    master, config = configured(workers=2, bind=[f"tcp://127.0.0.1:{port}"])
    config.write(workers=3, loglevel="debug", bind=[f"tcp://127.0.0.1:{port}", f"udp://127.0.0.1:{port}"])
    code, out, err = reload(capsys, master)
    assert code == EXIT_OK, err
    assert out.splitlines() == [f"bind: +udp://127.0.0.1:{port}", "workers: 2 -> 3", 'loglevel: "info" -> "debug"',
                                f"reloaded: master {master.proc.pid} runs 3 workers of generation 2"]
    assert datagram_request(("127.0.0.1", port), b"over udp") == b"over udp"
    assert line(("127.0.0.1", port), b"over tcp") == b"over tcp"
    assert sorted(w.generation for w in master.workers()) == [2] * 3
    wait_until(lambda: "[DEBUG]" in master.log().split("reload: bind:", 1)[-1], message=master.log())


def test_a_removed_listener_answers_what_was_queued_then_closes(configured, capsys, tmp_path):
    keep, drop = free_port(), free_port()
    socket_file = tmp_path / "m0" / "old.sock"
    binds = [f"tcp://127.0.0.1:{keep}", f"tcp://127.0.0.1:{drop}", f"unix:{socket_file}"]
    master, config = configured(workers=1, bind=binds)
    # The one worker is busy; connections wait in the removed listener's backlog meanwhile.
    busy = threading.Thread(target=line, args=(("127.0.0.1", keep), b"sleep 1.5"))
    busy.start()
    wait_until(lambda: master.workers()[0].state_name == "busy", message=master.log())
    queued = [socket.create_connection(("127.0.0.1", drop), timeout=SOCKET_TIMEOUT) for _ in range(5)]
    for number, sock in enumerate(queued):
        sock.sendall(b"queued %d\n" % number)
        sock.shutdown(socket.SHUT_WR)  # one line each: the handler answers it and is done
    config.write(workers=1, bind=[f"tcp://127.0.0.1:{keep}"])
    code, out, err = reload(capsys, master)
    busy.join(SOCKET_TIMEOUT)
    assert code == EXIT_OK, err
    assert f"bind: -tcp://127.0.0.1:{drop} -unix:{socket_file}" in out
    for number, sock in enumerate(queued):
        with sock:
            assert sock.makefile("rb").readline() == b"queued %d\n" % number
    # Each removed listener is closed (and its file removed) before its line is logged.
    wait_until(lambda: "closed listener tcp://127.0.0.1:%d" % drop in master.log()
               and "closed listener unix:%s" % socket_file in master.log(), message=master.log())
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", drop), timeout=SOCKET_TIMEOUT).close()
    assert not socket_file.exists()
    assert line(("127.0.0.1", keep), b"kept") == b"kept"


def test_a_reload_applies_mode_threads_user_and_hooks(configured, capsys, tmp_path, readable_app):
    port = free_port()
    master, config = configured(workers=1, bind=[f"tcp://127.0.0.1:{port}"], **readable_app)
    assert line(("127.0.0.1", port), b"thread") == b"MainThread"
    assert line(("127.0.0.1", port), b"uid") == b"0"
    config.write(workers=1, bind=[f"tcp://127.0.0.1:{port}"], mode="thread", threads=4, user="nobody",
                 group="nogroup", pre_fork="tests.reliability.hooks_fail:note_pre_fork")
    code, out, err = reload(capsys, master)
    assert code == EXIT_OK, err
    assert {'mode: "sync" -> "thread"', "threads: 16 -> 4", 'user: unset -> "nobody"'} <= set(out.splitlines())
    assert line(("127.0.0.1", port), b"thread").startswith(b"Thread-")
    assert line(("127.0.0.1", port), b"uid") == b"65534"
    assert (tmp_path / "m0" / "hooks.txt").read_text() == "pre_fork 2\n"


def test_a_listener_that_cannot_be_bound_refuses_the_reload_with_exit_4(configured, capsys):
    port = free_port()
    master, config = configured(workers=1, bind=[f"tcp://127.0.0.1:{port}"])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        config.write(workers=3, bind=[f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{busy}"])
        code, _, err = reload(capsys, master)
    assert code == EXIT_BIND, err
    assert f"cannot listen on tcp://127.0.0.1:{busy}: address already in use" in err
    assert [(w.generation, w.state_name) for w in master.workers()] == [(1, "idle")]
    assert line(("127.0.0.1", port), b"still the old one") == b"still the old one"


def test_a_bad_value_refuses_the_reload_with_exit_2_naming_the_file_and_setting(configured, capsys):
    port = free_port()
    master, config = configured(workers=1, bind=[f"tcp://127.0.0.1:{port}"])
    config.write(workers=1, bind=[f"tcp://127.0.0.1:{port}"], mode="turbo")
    code, _, err = reload(capsys, master)
    assert code == EXIT_USAGE, err
    assert "setting 'mode': 'turbo' is not allowed" in err and str(config.path) in err
    assert [w.generation for w in master.workers()] == [1]


def test_settings_a_reload_cannot_apply_are_named_with_exit_6(configured, capsys):
    port = free_port()
    master, config = configured(workers=1, bind=[f"tcp://127.0.0.1:{port}"])
    config.write(workers=2, bind=[f"tcp://127.0.0.1:{port}"], preload=True)
    code, out, err = reload(capsys, master)
    assert code == EXIT_NOT_APPLIED
    assert "workers: 1 -> 2" in out
    assert "not applied: preload: false -> true: the app is imported in the master, once; apply with " \
           "`prefork upgrade`" in err
    assert "WARNING" in master.log() and "not applied: preload" in master.log()
    assert line(("127.0.0.1", port), b"imported-in") != str(master.proc.pid).encode()


def test_a_reload_moves_the_metrics_process_to_its_new_address(configured, capsys):
    port, first, second = free_port(), free_port(), free_port()
    master, config = configured(workers=1, bind=[f"tcp://127.0.0.1:{port}"], metrics_bind=f"tcp://127.0.0.1:{first}")
    assert b"prefork_workers" in urllib.request.urlopen(f"http://127.0.0.1:{first}/metrics", timeout=10).read()
    config.write(workers=1, bind=[f"tcp://127.0.0.1:{port}"], metrics_bind=f"tcp://127.0.0.1:{second}")
    code, out, err = reload(capsys, master)
    assert code == EXIT_OK, err
    assert f'metrics_bind: "tcp://127.0.0.1:{first}" -> "tcp://127.0.0.1:{second}"' in out
    assert b"prefork_workers" in urllib.request.urlopen(f"http://127.0.0.1:{second}/metrics", timeout=10).read()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{first}/metrics", timeout=10)


def test_new_workers_dying_in_post_fork_cancel_the_reload(configured, capsys):
    port = free_port()
    master, config = configured(workers=2, bind=[f"tcp://127.0.0.1:{port}"])
    (config.path.parent / "post_fork.fail").touch()
    config.write(workers=4, bind=[f"tcp://127.0.0.1:{port}"], post_fork="tests.reliability.hooks_fail:post_fork")
    code, _, err = reload(capsys, master)
    assert code == EXIT_APP_LOAD, err
    assert "cancelled the reload" in err and "post_fork hook failed" in err and "RuntimeError" in err
    wait_until(lambda: [(w.generation, w.state_name) for w in master.workers()] == [(1, "idle")] * 2,
               message=master.log())
    assert line(("127.0.0.1", port), b"old generation") == b"old generation"
    status, out, _ = prefork(capsys, "status", "-p", str(master.pidfile), "--json")
    assert status == EXIT_OK and re.search(r'"target": 2', out), out
