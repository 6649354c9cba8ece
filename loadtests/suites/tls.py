"""TLS: handshakes, TLS echo and HTTPS, prefork against gunicorn --certfile/--keyfile. Runs in: bench.

Run from the repository root, on Linux with wrk, gunicorn and trustme installed (the test extra)::

    .venv/bin/python -m loadtests.bench tls            # writes docs/benchmarks-tls.md
    .venv/bin/python -m loadtests.bench tls --quick    # small counts, writes nothing

Every row: a fresh server with 2 workers (prefork's are ``?tls`` listeners; gunicorn's sync and
gthread workers get ``--certfile/--keyfile``), a warm-up, then the measured load for
``--seconds``; server CPU is the whole process tree's user + system time (as in ``compare``).
The certificate (ECDSA P-256, trustme's default) is made at run time in a temporary directory.

Groups (data rows below):

- ``tls-short``: a full handshake per connection, one echo line, close (``workers.echo``, in
  sync mode and in asyncio mode on uvloop and on asyncio's loop);
  ``tls-resumed``: the same with the client resuming its TLS session (a session ticket from a
  previous connection): what tickets save per connection. TLS 1.3 resumption (psk_dhe_ke)
  still does the ECDHE exchange, so it saves the certificate signature and chain, not the
  key exchange. Workers share the ticket keys (one context, made before fork), so a ticket
  from one worker resumes on another.
- ``tls-keepalive``: one TLS connection per client, echo lines back to back.
- ``https-close`` and ``https-keepalive``: wrk over HTTPS, ``workers.wsgi:hello``.

The TLS echo load is Python (``ssl``) in ``--load-processes`` processes, one connection at a time
each; it costs as much CPU per handshake as the server, so CPU per request is the figure to
compare. Targets of issue 14: handshake CPU per connection no more than gunicorn's (gunicorn
serves no raw TCP, so the HTTPS rows without keep-alive compare handshakes); HTTPS keep-alive
req/s at least 1.5x gunicorn gthread's.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import ssl
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path

from loadtests.harness import LOOPBACK, ROOT, START_TIMEOUT, percentile, positive, progress, report_head, serving, write_report
from loadtests.load import LINE, LoadResult, run_wrk
from loadtests.suites.compare import Result, Row, group_lines

OUTPUT = ROOT / "docs" / "benchmarks-tls.md"
WORKERS = 2
THREADS = 16
# Echo lines per TLS connection in the keep-alive rows before it is closed and reopened.
LINES_PER_CONNECTION = 100
# A TLS echo request slower than this counts as an error.
REQUEST_TIMEOUT = 2.0


def _prefork(app: str, *extra: str) -> tuple[str, ...]:
    return ("run", *app.split(), "--bind", "tcp://127.0.0.1:0?tls", "--workers", str(WORKERS), "--certfile",
            "{cert}", "--keyfile", "{key}", *extra)


_GUNICORN = ("-w", str(WORKERS), "--threads", str(THREADS), "-b", "127.0.0.1:0", "--log-level", "info",
             "--certfile", "{cert}", "--keyfile", "{key}", "workers.wsgi:hello", "-k")
_WSGI = "--wsgi workers.wsgi:hello"

ECHO = [("prefork sync", "prefork-cli", _prefork("workers.echo")),
        ("prefork asyncio uvloop", "prefork-cli", _prefork("workers.echo", "--mode", "asyncio", "--loop", "uvloop")),
        ("prefork asyncio asyncio", "prefork-cli", _prefork("workers.echo", "--mode", "asyncio", "--loop", "asyncio"))]
HTTPS = [("prefork --wsgi sync", "prefork-cli", _prefork(_WSGI)),
         ("prefork --wsgi thread", "prefork-cli", _prefork(_WSGI, "--mode", "thread", "--threads", str(THREADS))),
         ("gunicorn sync", "gunicorn", (*_GUNICORN, "sync")),
         ("gunicorn gthread", "gunicorn", (*_GUNICORN, "gthread"))]
GROUPS = {"tls-short": ECHO, "tls-resumed": ECHO, "tls-keepalive": ECHO, "https-close": HTTPS, "https-keepalive": HTTPS}
ROWS = [Row(group, *row, workers=WORKERS) for group, rows in GROUPS.items() for row in rows]
TITLES = {
    "tls-short": "TLS echo, a full handshake per connection (connect, handshake, one line, close)",
    "tls-resumed": "TLS echo, resumed sessions (the client presents its session ticket)",
    "tls-keepalive": f"TLS echo, persistent connections ({LINES_PER_CONNECTION} lines per connection)",
    "https-close": "HTTPS without keep-alive (wrk, `Connection: close`): a handshake per request",
    "https-keepalive": "HTTPS with keep-alive (wrk)",
}


# -- the TLS echo load -------------------------------------------------------------------------------


def _tls_client(group: str, address: tuple[str, int], ca: str, seconds: float, out: Connection) -> None:
    """Called in a forked load process: requests one after another for *seconds*; results to *out*."""
    context = ssl.create_default_context(cafile=ca)
    latencies: list[float] = []
    errors, session, sock = 0, None, None
    start_wall, start_cpu = time.monotonic(), time.process_time()
    while time.monotonic() - start_wall < seconds:
        began = time.monotonic()
        try:
            if sock is None:
                raw = socket.create_connection(address, timeout=REQUEST_TIMEOUT)
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock = context.wrap_socket(raw, server_hostname=LOOPBACK, session=session)
                reader, lines = sock.makefile("rb"), 0
            sock.sendall(LINE)
            if reader.readline() != LINE:
                raise ConnectionError("wrong echo")
            if group == "tls-resumed":
                session = sock.session  # TLS 1.3: the ticket came after the handshake, read with the reply
            lines += 1
            latencies.append(time.monotonic() - began)
        except OSError:
            errors += 1
            lines = LINES_PER_CONNECTION
        if group != "tls-keepalive" or lines >= LINES_PER_CONNECTION:
            if sock is not None:
                reader.close()  # the file holds a reference: the socket closes with both
                sock.close()
            sock = None
    out.send((latencies, errors, time.monotonic() - start_wall, time.process_time() - start_cpu))
    out.close()


def run_tls_load(group: str, address: tuple[str, int], ca: str, seconds: float, processes: int) -> LoadResult:
    context = multiprocessing.get_context("fork")
    children = []
    for _ in range(processes):
        receive, send = context.Pipe(duplex=False)
        child = context.Process(target=_tls_client, args=(group, address, ca, seconds, send), daemon=True)
        child.start()
        send.close()
        children.append((child, receive))
    latencies: list[float] = []
    errors, walls, load_cpu = 0, [], 0.0
    for child, receive in children:
        if not receive.poll(seconds + START_TIMEOUT):
            child.kill()
            raise RuntimeError("a TLS load process did not report")
        lat, child_errors, wall, cpu = receive.recv()
        child.join(START_TIMEOUT)
        latencies += lat
        errors, load_cpu = errors + child_errors, load_cpu + cpu
        walls.append(wall)
    return LoadResult(len(latencies), errors, max(walls), percentile(latencies, 0.5), percentile(latencies, 0.99),
                      load_cpu)


# -- rows -----------------------------------------------------------------------------------------------


def drive(row: Row, port: int, seconds: float, processes: int, ca: str) -> LoadResult:
    if row.group.startswith("https"):
        return run_wrk(f"https://{LOOPBACK}:{port}/", row.group == "https-keepalive", seconds, None)
    return run_tls_load(row.group, (LOOPBACK, port), ca, seconds, processes)


def measure(row: Row, directory: Path, settings: argparse.Namespace, files: dict[str, str]) -> Result:
    args = [arg.format(**files) for arg in row.args]
    with serving(row.role, args, directory, WORKERS) as server:
        drive(row, server.tcp_port, settings.warmup, settings.load_processes, files["ca"])
        before = server.cpu_seconds()
        load = drive(row, server.tcp_port, settings.seconds, settings.load_processes, files["ca"])
        return Result(row, False, load, server.cpu_seconds() - before)


def make_certificates(directory: Path) -> dict[str, str]:
    import trustme  # the test extra: no key material in the repository

    ca = trustme.CA()
    cert = ca.issue_cert(LOOPBACK, "localhost")
    files = {"ca": directory / "ca.pem", "cert": directory / "cert.pem", "key": directory / "key.pem"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    cert.private_key_pem.write_to_path(str(files["key"]))
    files["cert"].write_bytes(b"".join(pem.bytes() for pem in cert.cert_chain_pems))
    return {name: str(path) for name, path in files.items()}


def render(results: list[Result], argv: list[str]) -> str:
    lines = [*report_head("TLS: prefork against gunicorn", argv),
             f"{WORKERS} workers per server, unpinned; figures of one run (`--seconds` each, after a warm-up).", ""]
    for group, title in TITLES.items():
        lines += [f"## {title}", "", *group_lines(results, group), ""]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser, quick: bool) -> None:
    parser.add_argument("--seconds", type=float, default=2.0 if quick else 10.0, help="measured seconds per row")
    parser.add_argument("--warmup", type=float, default=1.0 if quick else 2.0, help="warm-up seconds per row")
    parser.add_argument("--load-processes", type=positive, default=2 if quick else 4,
                        help="TLS echo load processes (one connection at a time each)")
    parser.add_argument("--only", nargs="*", default=[], help="rows whose group or name contains one of these words")


def run(args: argparse.Namespace, argv: list[str]) -> None:
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-tls-") as tmp:
        files = make_certificates(Path(tmp))
        rows = [row for row in ROWS if not args.only or any(w in f"{row.group} {row.name}" for w in args.only)]
        for index, row in enumerate(rows):
            progress(f"{index + 1}/{len(rows)}: {row.group}: {row.name}")
            result = measure(row, Path(tmp) / str(index), args, files)
            progress(f"  {result.rps:,.0f} req/s, {result.load.errors} errors, {result.cpu_us:.1f} µs CPU/req")
            results.append(result)
    write_report(render(results, argv), args.output)
