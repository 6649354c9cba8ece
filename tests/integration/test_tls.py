"""TLS and the PROXY protocol on real masters (README "TLS", "PROXY protocol"), with real clients:
Python's ssl, `openssl s_client`, `curl --cacert`. Certificates are made at test time (trustme).

One master (one worker: a stalled client must not block it) serves four listeners for most
tests, once per worker loop (sync; asyncio mode on asyncio's loop and on uvloop); mutual TLS over HTTP, the reload rotation and a refused start have their own.
"""

from __future__ import annotations

import json
import os
import select
import socket
import ssl
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from prefork.errors import EXIT_OK, EXIT_USAGE
from prefork.proxy import V2_SIGNATURE
from tests.integration.conftest import Load, Master
from tests.integration.test_cli import cli_master, prefork  # noqa: F401 (a fixture)
from tests.integration.test_reload import Config
from tests.support import SOCKET_TIMEOUT, Certs, require_tool, wait_until

pytestmark = pytest.mark.integration

# A handshake or PROXY header not done in this long is closed: short, so the stall tests are quick.
HANDSHAKE_TIMEOUT = 0.5
# Loopback addresses other than 127.0.0.1: a peer outside proxy_allow_ips' default.
STRANGER_HOST = "127.0.0.3"


# The worker loops that serve the edge: the synchronous one (its parking lot does the stages) and
# asyncio mode on either event loop (prefork.aiostages does them): the same promises, the same words.
EDGE_MODES: dict[str, dict[str, Any]] = {"sync": {}, "asyncio": {"mode": "asyncio", "loop": "asyncio"},
                                         "uvloop": {"mode": "asyncio", "loop": "uvloop"}}


@pytest.fixture(scope="module", params=list(EDGE_MODES))
def edge(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, certs: Certs) -> Iterator[Master]:
    """One echo worker: ?tls (client certificates optional), ?proxy, ?proxy=v2&tls, ?proxy&allow=."""
    directory = tmp_path_factory.mktemp(f"edge-{request.param}")
    master = Master(directory, "workers.echo", [
        "tcp://127.0.0.1:0?tls", "tcp://127.0.0.1:0?proxy", "tcp://127.0.0.1:0?proxy=v2&tls",
        "tcp://127.0.0.1:0?proxy&allow=192.0.2.0/24",
    ], workers=1, certfile=str(certs.server[0]), keyfile=str(certs.server[1]), ca_certs=str(certs.ca),
        cert_reqs="optional", handshake_timeout=HANDSHAKE_TIMEOUT, access_log=str(directory / "access.log"),
        **EDGE_MODES[request.param])
    try:
        yield master.wait_ready()
    finally:
        master.kill_group()


TLS, PROXY, PROXY_TLS, PROXY_ALLOW = range(4)


def access_lines(master: Master) -> list[str]:
    path = master.dir / "access.log"
    return path.read_text().splitlines() if path.exists() else []


def wait_access(master: Master, *words: str) -> str:
    """The access log line that has all *words* (workers write it within a second)."""
    def found() -> str | None:
        return next((line for line in access_lines(master) if all(w in line for w in words)), None)
    return str(wait_until(found, 10, message=f"no access line with {words}: {access_lines(master)[-5:]}"))


def wait_log(master: Master, *words: str) -> str:
    def found() -> str | None:
        return next((line for line in master.log().splitlines() if all(w in line for w in words)), None)
    return str(wait_until(found, 10, message=f"no log line with {words}:\n{master.log()[-3000:]}"))


def connect(master: Master, index: int, source: str | None = None) -> socket.socket:
    return socket.create_connection(master.address(index), timeout=SOCKET_TIMEOUT,
                                    source_address=(source, 0) if source else None)


def echo(sock: socket.socket, line: bytes) -> bytes:
    sock.sendall(line + b"\n")
    return sock.makefile("rb").readline().rstrip(b"\n")


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server has closed *sock* (EOF or reset) without answering."""
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True


def tls_echo(certs: Certs, sock: socket.socket, line: bytes, pair: tuple[Path, Path] | None = None) -> bytes:
    with certs.client_context(pair).wrap_socket(sock, server_hostname="127.0.0.1") as tls:
        return echo(tls, line)


def refused(certs: Certs, sock: socket.socket, pair: tuple[Path, Path]) -> bool:
    """True if the server refuses *pair*, the client's certificate: TLS 1.3 sends it after the
    server's Finished, so the client learns it from the server's alert (sync mode) or from the
    connection closed without an echo (asyncio's loops close without sending the alert)."""
    try:
        return tls_echo(certs, sock, b"refused", pair) == b""
    except (ssl.SSLError, ConnectionError):
        return True


def proxy_v1(host: str, port: int = 50000) -> bytes:
    return f"PROXY TCP4 {host} 127.0.0.1 {port} 443\r\n".encode()


def proxy_v2(host: str, port: int = 50000) -> bytes:
    body = socket.inet_aton(host) + socket.inet_aton("127.0.0.1") + struct.pack("!HH", port, 443)
    return V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", len(body)) + body


# -- TLS ---------------------------------------------------------------------------------------------


def test_python_ssl_client_gets_its_echo_and_the_access_log_shows_the_tls_version(edge: Master, certs: Certs) -> None:
    assert tls_echo(certs, connect(edge, TLS), b"over tls") == b"over tls"
    line = wait_access(edge, edge.info["listeners"][TLS], "tls=TLSv1.3/")
    assert " ok " in line


def test_openssl_s_client_verifies_the_chain_and_gets_its_echo(edge: Master, certs: Certs) -> None:
    host, port = edge.address(TLS)
    with subprocess.Popen([require_tool("openssl"), "s_client", "-brief", "-connect", f"{host}:{port}",
                           "-CAfile", str(certs.ca), "-verify_return_error"],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        try:
            proc.stdin.write(b"hello openssl\n")
            proc.stdin.flush()
            out = read_until(proc.stdout, b"hello openssl\n")
            proc.stdin.close()
            assert proc.wait(SOCKET_TIMEOUT) == 0
            err = proc.stderr.read().decode()
        finally:
            if proc.poll() is None:
                proc.kill()
    assert out == b"hello openssl\n"
    assert "Verification: OK" in err and "Protocol version: TLSv1.3" in err, err


def read_until(stream: Any, marker: bytes, timeout: float = SOCKET_TIMEOUT) -> bytes:
    deadline, data = time.monotonic() + timeout, b""
    while marker not in data:
        left = deadline - time.monotonic()
        assert left > 0, f"no {marker!r} within {timeout}s: {data!r}"
        if select.select([stream], [], [], left)[0]:
            chunk = os.read(stream.fileno(), 4096)
            assert chunk, f"EOF before {marker!r}: {data!r}"
            data += chunk
    return data


def test_client_certificates_are_checked_when_sent(edge: Master, certs: Certs) -> None:
    assert tls_echo(certs, connect(edge, TLS), b"signed", certs.client) == b"signed"
    for pair, reason in ((certs.expired, "certificate has expired"), (certs.stranger, "unable to get local issuer")):
        assert refused(certs, connect(edge, TLS), pair)
        wait_log(edge, "TLS handshake failed", reason)


def test_a_plaintext_client_on_a_tls_port_is_closed_with_one_log_line(edge: Master) -> None:
    with connect(edge, TLS) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert wait_until(lambda: closed_by_server(sock), SOCKET_TIMEOUT)
    wait_log(edge, "TLS handshake failed", "HTTP_REQUEST")


def test_a_stalled_handshake_never_blocks_the_one_worker_and_is_closed_in_time(edge: Master, certs: Certs) -> None:
    with connect(edge, TLS) as stalled:
        stalled.sendall(b"\x16\x03\x01\x02\x00")  # the start of a ClientHello, and nothing more
        started = time.monotonic()
        assert tls_echo(certs, connect(edge, TLS), b"meanwhile") == b"meanwhile"  # served by the same worker
        assert wait_until(lambda: closed_by_server(stalled), SOCKET_TIMEOUT + HANDSHAKE_TIMEOUT)
        assert time.monotonic() - started < HANDSHAKE_TIMEOUT + 2
    wait_log(edge, "stalled in their TLS handshake")
    assert "Traceback" not in edge.log()


# -- PROXY protocol ----------------------------------------------------------------------------------


def test_the_proxy_header_names_the_client_in_the_access_log(edge: Master) -> None:
    with connect(edge, PROXY) as sock:
        sock.sendall(proxy_v1("203.0.113.9", 41001))
        assert echo(sock, b"via v1") == b"via v1"
    with connect(edge, PROXY) as sock:
        sock.sendall(proxy_v2("203.0.113.10", 41002) + b"with data in the same segment\n")
        assert sock.makefile("rb").readline() == b"with data in the same segment\n"
    wait_access(edge, "203.0.113.9:41001 ", " ok")
    wait_access(edge, "203.0.113.10:41002 ", " ok")


def test_proxy_v2_then_tls(edge: Master, certs: Certs) -> None:
    sock = connect(edge, PROXY_TLS)
    sock.sendall(proxy_v2("203.0.113.11", 41003))
    assert tls_echo(certs, sock, b"proxied tls") == b"proxied tls"
    wait_access(edge, "203.0.113.11:41003 ", "tls=TLSv1.3/")


def test_the_allow_list_checks_the_client_the_header_names(edge: Master) -> None:
    with connect(edge, PROXY_ALLOW) as sock:
        sock.sendall(proxy_v1("192.0.2.44"))
        assert echo(sock, b"allowed") == b"allowed"
    with connect(edge, PROXY_ALLOW) as sock:
        sock.sendall(proxy_v1("198.51.100.44") + b"refused\n")
        assert wait_until(lambda: closed_by_server(sock), SOCKET_TIMEOUT)
    wait_access(edge, "198.51.100.44:50000 ", "refused")


@pytest.mark.parametrize("send, kind", [
    (proxy_v1("203.0.113.1") + b"x\n", "untrusted peer"),  # from 127.0.0.3, outside proxy_allow_ips
    (b"junk" + proxy_v1("203.0.113.1"), "no header"),  # garbage before the header
    (proxy_v2("203.0.113.1")[:20], "truncated"),  # then the client closes
    (b"PROXY TCP4 203.0.113.1 127.0.0.1 1\r\n", "malformed"),
])
def test_a_bad_or_untrusted_header_closes_the_connection_with_one_log_line(edge: Master, send: bytes, kind: str) -> None:
    with connect(edge, PROXY, source=STRANGER_HOST if kind == "untrusted peer" else None) as sock:
        sock.sendall(send)
        if kind == "truncated":
            sock.shutdown(socket.SHUT_WR)
        assert wait_until(lambda: closed_by_server(sock), SOCKET_TIMEOUT)
    wait_log(edge, "PROXY header failed", kind)
    assert not [line for line in access_lines(edge) if "203.0.113.1:" in line]


def test_a_truncated_header_that_stalls_is_closed_after_handshake_timeout(edge: Master) -> None:
    with connect(edge, PROXY) as sock:
        sock.sendall(proxy_v2("203.0.113.2")[:20])
        assert wait_until(lambda: closed_by_server(sock), SOCKET_TIMEOUT)
    wait_log(edge, "stalled in their PROXY header")


# -- mutual TLS over HTTP, with curl ---------------------------------------------------------------


def test_curl_over_mutual_tls_to_workers_http(start_master: Any, certs: Certs) -> None:
    master = start_master("workers.http", ["tcp://127.0.0.1:0?tls"], workers=1, certfile=str(certs.server[0]),
                          keyfile=str(certs.server[1]), ca_certs=str(certs.ca), cert_reqs="required",
                          alpn_protocols=["http/1.1"])
    host, port = master.address()
    url = f"https://{host}:{port}/health"
    curl = [require_tool("curl"), "-sS", "--max-time", str(SOCKET_TIMEOUT), "--cacert", str(certs.ca)]
    ok = subprocess.run([*curl, "--cert", str(certs.client[0]), "--key", str(certs.client[1]), "-w",
                         " %{http_code} %{ssl_verify_result}", url], capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0 and ok.stdout == "ok 200 0", (ok.stdout, ok.stderr)
    refused = subprocess.run([*curl, url], capture_output=True, text=True, timeout=30)
    assert refused.returncode != 0, refused.stdout
    wait_log(master, "TLS handshake failed", "PEER_DID_NOT_RETURN_A_CERTIFICATE")


def test_a_wsgi_app_over_tls_sees_https_in_its_environ(start_master: Any, certs: Certs) -> None:
    """curl through a ?tls listener served by workers.wsgi: wsgi.url_scheme is https, HTTPS is on."""
    master = start_master("workers.wsgi", ["tcp://127.0.0.1:0?tls"], workers=1, certfile=str(certs.server[0]),
                          keyfile=str(certs.server[1]), service_options={"app": "tests.test_http_corpus:report_app"})
    host, port = master.address()
    done = subprocess.run([require_tool("curl"), "-sS", "--max-time", str(SOCKET_TIMEOUT), "--cacert", str(certs.ca),
                           f"https://{host}:{port}/where?x=1"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert (seen["wsgi.url_scheme"], seen["HTTPS"], seen["QUERY_STRING"]) == ("https", "on", "x=1")


# -- certificates checked at start and rotated by a reload -----------------------------------------


def test_a_bad_key_file_refuses_the_start_with_exit_2_naming_it(tmp_path: Path, certs: Certs) -> None:
    bad = tmp_path / "bad.key"
    bad.write_text("not a key\n")
    cases = {"keyfile": [str(certs.server[0]), str(bad)], "does not hold the key": [str(certs.server[0]),
             str(certs.client[1])], "cannot read": [str(tmp_path / "missing.crt"), str(certs.server[1])]}
    for words, (certfile, keyfile) in cases.items():
        done = subprocess.run([sys.executable, "-m", "prefork", "run", "workers.echo", "--bind", "tcp://127.0.0.1:0?tls",
                               "--certfile", certfile, "--keyfile", keyfile, "--workers", "1"],
                              capture_output=True, text=True, timeout=60, cwd=tmp_path,
                              env={k: v for k, v in os.environ.items() if not k.startswith("PREFORK_")})
        assert done.returncode == EXIT_USAGE, (words, done.stderr)
        assert words in done.stderr and (keyfile if "read" not in words else certfile) in done.stderr, done.stderr


@pytest.mark.parametrize("mode", ["sync", "asyncio"])
def test_a_reload_rotates_the_certificate_under_load_without_a_failed_handshake(
        cli_master: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path, certs: Certs, mode: str) -> None:
    cert, key = tmp_path / "m0" / "cert.pem", tmp_path / "m0" / "key.pem"
    config = Config(tmp_path / "m0")
    cert.write_bytes(certs.server[0].read_bytes())
    key.write_bytes(certs.server[1].read_bytes())
    config.write(workers=2, bind=["tcp://127.0.0.1:0?tls"], certfile=str(cert), keyfile=str(key), mode=mode)
    master = cli_master("workers.echo", "-c", "prefork.toml", workers=2)
    [address] = master.listening()["tcp"]
    served: set[bytes] = set()
    with TLSLoad(master, address, certs, served) as load:
        load.wait_requests(50)
        for name, pair in (("rotated", certs.rotated),):
            replace(cert, pair[0].read_bytes())
            replace(key, pair[1].read_bytes())
            code, out, err = prefork(capsys, "reload", "-p", str(master.pidfile), "--timeout", "30")
            assert code == EXIT_OK, err
            assert "certfile, keyfile, ca_certs: new contents, served by the new workers" in out.splitlines(), out
            rotated = _der(pair[0])
            wait_until(lambda: rotated in served, 15, message=f"the {name} certificate is never served")
            load.wait_requests(50)
        key.write_bytes(certs.client[1].read_bytes())  # a key that does not match: refused, kept
        code, _, err = prefork(capsys, "reload", "-p", str(master.pidfile), "--timeout", "30")
        assert code == EXIT_USAGE and str(key) in err and "does not hold the key" in err, err
        load.wait_requests(50)
    assert load.failures == [] and load.ok >= 150, (load.ok, load.failures[:5])
    assert rotated in served


def _der(path: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(path.read_text().split("-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----\n")


def replace(path: Path, data: bytes) -> None:
    """Write *path* atomically, as a deployment tool does (a reader never sees half a file)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class TLSLoad(Load):
    """Clients in threads: a new TLS connection per request (a full handshake), one echo; the
    certificates they were served are collected in *served*."""

    def __init__(self, master: Any, address: tuple[str, int], certs: Certs, served: set[bytes]) -> None:
        super().__init__(master, clients=3)
        self.address, self.context, self.served = address, certs.client_context(), served

    def _run(self) -> None:
        for count in range(100_000):  # bounded whatever happens
            if self._stop.is_set():
                return
            line = f"request {count}".encode()
            der = b""
            try:
                with self.context.wrap_socket(socket.create_connection(self.address, timeout=SOCKET_TIMEOUT),
                                              server_hostname="127.0.0.1") as sock:
                    der = sock.getpeercert(binary_form=True) or b""
                    failure = None if echo(sock, line) == line else "wrong echo"
            except OSError as exc:
                failure = repr(exc)
            with self._lock:
                if failure is None:
                    self.ok += 1
                    self.served.add(der)
                else:
                    self.failures.append(failure)
