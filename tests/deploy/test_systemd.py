"""prefork as deploy/systemd runs it, with real processes: socket activation through
systemd-socket-activate (LISTEN_FDS), sd_notify on a NOTIFY_SOCKET of the test's, reload,
upgrade and stop through the CLI; and logrotate's USR1 through `prefork reopen-logs`."""

from __future__ import annotations

import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from tests.deploy.conftest import DEPLOY, PREFORK, Master, gone, prefork, render, run, tool
from tests.support import SOCKET_TIMEOUT, datagram_request, wait_until

pytestmark = pytest.mark.integration

# Puts the test's two sockets at fds 3 and 4 (sd_listen_fds(3)), sets LISTEN_PID to its own pid
# (kept by exec) and execs systemd-socket-activate, which passes them on as systemd would: it
# waits for the first connection, then execs prefork with LISTEN_FDS=2. (systemd-socket-activate
# -l cannot bind port 0, so the test binds and hands the sockets in.)
_AT_FD_3_AND_4 = """\
import fcntl, os, sys
high = [fcntl.fcntl(int(fd), fcntl.F_DUPFD, 10) for fd in sys.argv[1:3]]
for fd in sys.argv[1:3]:
    os.close(int(fd))
for target, fd in zip((3, 4), high):
    os.dup2(fd, target)
    os.close(fd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="2")
os.execv(sys.argv[3], sys.argv[3:])
"""


def activated_master(directory: Path, processes: list, env: dict[str, str] | None = None,
                     bind: tuple[str, ...] = ("--bind", "systemd")):
    """prefork.service's command under systemd-socket-activate, on a TCP and a UDP socket of
    the test's (as prefork.socket's ListenStream and ListenDatagram); returns (master, tcp, udp)."""
    tcp = socket.create_server(("127.0.0.1", 0))
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    with tcp, udp:
        setenv = [arg for name, value in (env or {}).items() for arg in ("-E", f"{name}={value}")]
        launcher = [sys.executable, "-c", _AT_FD_3_AND_4, str(tcp.fileno()), str(udp.fileno()),
                    tool("systemd-socket-activate"), "-E", "PYTHONUNBUFFERED=1", *setenv]
        master = Master(directory, [*bind, "--workers", "2", "--graceful-timeout", "5", "workers.echo"],
                        launcher=launcher, pass_fds=(tcp.fileno(), udp.fileno()))
        processes.append(master)
        return master, tcp.getsockname(), udp.getsockname()


def echo_line(address, line: bytes) -> bytes:
    with socket.create_connection(address, timeout=SOCKET_TIMEOUT) as sock:
        sock.sendall(line + b"\n")
        sock.shutdown(socket.SHUT_WR)
        return sock.makefile("rb").readline().rstrip(b"\n")


def test_without_a_bind_a_socket_activated_master_serves_only_the_passed_sockets(tmp_path, processes):
    """As gunicorn does: LISTEN_FDS for the master's pid and no bind given means bind systemd,
    not the service's DEFAULT_BIND beside the passed sockets; across an upgrade too."""
    master, tcp, udp = activated_master(tmp_path / "m", processes, bind=())
    assert echo_line(tcp, b"first") == b"first"
    master.wait_ready(2)
    assert "socket activation: serving the 2 socket(s) systemd passed (LISTEN_FDS), as no bind was given" \
        in master.log()
    assert datagram_request(udp, b"datagram") == b"datagram"
    assert master.tcp_port() == tcp[1]  # only the passed TCP socket: not echo's 127.0.0.1:9000
    prefork("upgrade", "-p", str(master.pidfile))
    new = master.master_pid()
    assert master.wait() == 0 and master.tcp_port(new) == tcp[1]
    assert datagram_request(udp, b"after upgrade") == b"after upgrade"
    assert [c.laddr.port for c in psutil.Process(new).net_connections(kind="udp")] == [udp[1]]


def test_socket_activation_serves_the_first_connection_and_both_sockets_across_an_upgrade(tmp_path, processes):
    master, tcp, udp = activated_master(tmp_path / "m", processes)
    # The connection that makes systemd-socket-activate start prefork waits in the backlog and is served.
    assert echo_line(tcp, b"first") == b"first"
    master.wait_ready(2)
    assert master.master_pid() == master.pid, "exec'd in place: LISTEN_PID named this very process"
    assert "Communication attempt on fd 3" in master.log()
    assert datagram_request(udp, b"datagram") == b"datagram"

    prefork("upgrade", "-p", str(master.pidfile))  # the systemd sockets go to the new master (PREFORK_FDS)
    new = master.master_pid()
    assert new != master.pid and master.wait() == 0
    assert master.tcp_port(new) == tcp[1]
    assert echo_line(tcp, b"after upgrade") == b"after upgrade"
    assert datagram_request(udp, b"after upgrade") == b"after upgrade"

    prefork("stop", "-p", str(master.pidfile))
    assert gone(new) and not master.pidfile.exists()
    with pytest.raises(ConnectionRefusedError):
        echo_line(tcp, b"nobody")  # systemd would hold the socket; the test's launcher does not


# -- sd_notify ---------------------------------------------------------------------------------


@dataclass
class Message:
    pid: int
    fields: dict[str, str]


def notify_socket(directory: Path) -> socket.socket:
    """The test's NOTIFY_SOCKET: a datagram socket that learns each sender's pid (SO_PASSCRED),
    as systemd's does."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    sock.bind(str(directory / "notify"))
    return sock


def receive(sock: socket.socket, until, timeout: float = 30.0) -> list[Message]:
    """Messages until until(messages) holds. Read after each step: a Unix datagram queue holds
    only net.unix.max_dgram_qlen (10) messages, and prefork drops one it cannot send within 1 s."""
    messages: list[Message] = []
    deadline = time.monotonic() + timeout
    while not until(messages):
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data, ancillary, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("3i")))
        except TimeoutError:
            raise AssertionError(f"notifications so far: {messages}") from None
        pid = next(struct.unpack("3i", d)[0] for level, kind, d in ancillary
                   if (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS))
        messages.append(Message(pid, dict(line.split("=", 1) for line in data.decode().splitlines())))
    return messages


def has(key: str, value: str | None = None, pid: int | None = None):
    return lambda messages: any(key in m.fields and value in (None, m.fields[key]) and pid in (None, m.pid)
                                for m in messages)


@dataclass
class NotifyAccessMain:
    """What systemd (service_notify_message, v252) makes of the messages for a Type=notify unit
    with NotifyAccess=main: only the main pid is heard; MAINPID= moves it; of READY/RELOADING/
    STOPPING in one message the last one counts; ``states`` lists the changes of state.

    (The new master's own READY=1 after an upgrade races with the old master's MAINPID=: heard
    before it, it is ignored; after it, it is a READY=1 while running. Either way nothing changes.)
    """

    main: int
    states: list[str] = field(default_factory=list)

    def feed(self, message: Message) -> None:
        if message.pid != self.main:
            return  # "Got notification message from PID ..., but reception only permitted for main PID"
        if "MAINPID" in message.fields:
            self.main = int(message.fields["MAINPID"])
        state = [s for key, s in (("READY", "running"), ("RELOADING", "reloading"), ("STOPPING", "stopping"))
                 if message.fields.get(key) == "1"]
        if state and self.states[-1:] != state[-1:]:
            self.states.append(state[-1])  # READY=1 while running changes nothing


def test_sd_notify_through_reload_upgrade_and_stop(tmp_path, sock_dir, processes):
    with notify_socket(sock_dir) as notify:
        master, tcp, _ = activated_master(tmp_path / "m", processes, env={"NOTIFY_SOCKET": str(sock_dir / "notify")})
        assert echo_line(tcp, b"start") == b"start"
        old = master.pid
        log = receive(notify, has("READY", "1"))
        prefork("reload", "-p", str(master.pidfile))
        log += receive(notify, lambda m: has("RELOADING", "1")(m) and has("READY", "1")(m))
        prefork("upgrade", "-p", str(master.pidfile))
        new = master.master_pid()
        # The old master, still the main pid, names its successor as it leaves.
        log += receive(notify, has("MAINPID", str(new), pid=old))
        assert master.wait() == 0
        prefork("stop", "-p", str(master.pidfile))
        log += receive(notify, has("STOPPING", "1", pid=new))

    assert [m.fields for m in log[:3]] == [
        {"READY": "1", "STATUS": "2 workers ready, generation 1"},
        {"RELOADING": "1", "MONOTONIC_USEC": log[1].fields["MONOTONIC_USEC"]},
        {"READY": "1", "STATUS": "2 workers ready, generation 2"}]
    assert {m.pid for m in log[:3]} == {old} and int(log[1].fields["MONOTONIC_USEC"]) > 0
    systemd = NotifyAccessMain(main=old)
    for message in log:
        systemd.feed(message)
    # Running, reloaded, handed over to the new master without ever looking stopped, then stopped.
    assert (systemd.states, systemd.main) == (["running", "reloading", "running", "stopping"], new), log
    assert log[-1].pid == new and log[-1].fields.get("STOPPING") == "1"


# -- logrotate ---------------------------------------------------------------------------------


def test_logrotate_moves_the_log_and_usr1_makes_prefork_write_a_new_one(tmp_path, processes):
    logs = tmp_path / "log"
    logs.mkdir()
    master = Master(tmp_path / "m", ["--bind", "tcp://127.0.0.1:0", "--workers", "1",
                                     "--error-log", str(logs / "error.log"), "workers.echo"])
    processes.append(master)
    master.wait_ready(1)
    wait_until(lambda: "ready" in (logs / "error.log").read_text(), 10, message="nothing in the error log")
    conf = tmp_path / "logrotate.conf"
    conf.write_text(render((DEPLOY / "logrotate" / "prefork").read_text(), [
        (r"^/var/log/prefork/\S+ /var/log/prefork/\S+ \{", f"{logs}/*.log {{"),
        (r"^(\s+)su prefork prefork$", r"\1su root root"),  # the test runs as root, with no prefork user
        (r"/run/prefork/prefork.pid /run/prefork/\*/prefork.pid", str(master.pidfile)),
        (r"/opt/prefork/bin/prefork", PREFORK)]))

    done = run([tool("logrotate"), "--verbose", "--force", "--state", str(tmp_path / "state"), str(conf)])
    assert done.returncode == 0 and "error:" not in done.stderr, done.stdout + done.stderr
    assert "ready" in (logs / "error.log.1").read_text()  # moved, and not compressed yet (delaycompress)
    wait_until(lambda: (logs / "error.log").exists(), 10, message=f"no new error.log after USR1:\n{master.log()}")
    prefork("reload", "-p", str(master.pidfile))
    wait_until(lambda: "reloaded" in (logs / "error.log").read_text(), 10, message="the new log gets nothing")
    assert "reloaded" not in (logs / "error.log.1").read_text()
