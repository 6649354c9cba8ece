"""TLS on stream listeners: the context built and checked from files, the handshake stepped without blocking. Runs in: both.

Rules:

1. The master builds the ``ssl.SSLContext`` (``build_context``) when it starts and on every
   reload, before any fork: a file that is missing, unreadable, not PEM, encrypted without a
   password, or a certificate and key that do not match is a ConfigError naming the file, so
   the start is refused (exit 2) or the reload is (the running generation keeps serving).
   Workers inherit the context through fork: a reload with new files rotates the certificate
   for the new generation, while the old one finishes with the old. The files are read as the
   master's user, before workers drop privileges.
2. The key's password comes from a file (``key_password_file``) or from an environment variable
   whose name is a setting (``key_password_env``), never from the command line.
3. The handshake (``HandshakeStage``) runs in the worker's parking lot (prefork.parking), after
   the PROXY header: the socket is wrapped with ``do_handshake_on_connect=False`` and
   ``do_handshake()`` is stepped whenever the socket is readable or writable, so a stalled
   client costs a descriptor, never the worker. Once done, the ``ssl.SSLSocket`` is blocking
   again, as an accepted socket is, and reaches the handler as ``self.request``.
4. A failed handshake is one log line per kind of failure (OpenSSL's reason) per interval,
   never a traceback; a client that resets is forgotten silently.
"""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
from typing import Mapping, Sequence

from prefork.errors import ConfigError
from prefork.parking import Connection, StageFailed, Waiting

__all__ = ["HandshakeStage", "handshake_failure", "build_context", "key_password", "files_digest", "CERT_REQS", "MIN_VERSIONS"]

CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}
# TLS 1.0 and 1.1 are deprecated (RFC 8996) and refused by OpenSSL 3's default security level.
MIN_VERSIONS = {"tlsv1.2": ssl.TLSVersion.TLSv1_2, "tlsv1.3": ssl.TLSVersion.TLSv1_3}


def key_password(password_file: str | None, password_env: str | None,
                 environ: Mapping[str, str] = os.environ) -> str | None:
    """The key's password (rule 2): the file's first line, or the named variable's value."""
    if password_file:
        text = _read("key_password_file", password_file).decode("utf-8", "replace")
        return text.splitlines()[0] if text else ""
    if password_env:
        if password_env not in environ:
            raise ConfigError(f"setting 'key_password_env': the environment variable {password_env} is not set")
        return environ[password_env]
    return None


def build_context(certfile: str, keyfile: str | None = None, password: str | None = None, *,
                  ca_certs: str | None = None, cert_reqs: str = "none", min_version: str = "tlsv1.2",
                  ciphers: str | None = None, alpn_protocols: Sequence[str] = ()) -> ssl.SSLContext:
    """A server context from the files (rule 1); ConfigError naming the file or setting at fault."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MIN_VERSIONS[min_version.lower()]
    _load_chain(context, certfile, keyfile, password)
    if ca_certs:
        _read("ca_certs", ca_certs)
        try:
            context.load_verify_locations(cafile=ca_certs)
        except ssl.SSLError as exc:
            raise ConfigError(f"setting 'ca_certs': {ca_certs} holds no PEM certificate ({exc.reason})") from None
    elif cert_reqs != "none":
        raise ConfigError(f"setting 'cert_reqs': {cert_reqs} verifies client certificates against ca_certs; "
                          "set ca_certs to the CA file")
    context.verify_mode = CERT_REQS[cert_reqs]
    if ciphers:
        try:
            context.set_ciphers(ciphers)
        except ssl.SSLError:
            raise ConfigError(f"setting 'ciphers': {ciphers!r} selects no cipher OpenSSL knows") from None
    if alpn_protocols:
        context.set_alpn_protocols(list(alpn_protocols))
    return context


def files_digest(*paths: str | None) -> str:
    """A digest of the files' contents (unreadable ones count as empty): a reload compares it to
    say that the certificate or key changed although their paths did not."""
    digest = hashlib.sha256()
    for path in filter(None, paths):
        try:
            with open(path, "rb") as file:
                digest.update(file.read())
        except OSError:
            pass  # build_context has refused it already, naming the file
        digest.update(b"\0")
    return digest.hexdigest()


def _load_chain(context: ssl.SSLContext, certfile: str, keyfile: str | None, password: str | None) -> None:
    cert = _read("certfile", certfile)
    key = _read("keyfile", keyfile) if keyfile else cert
    key_name = f"keyfile {keyfile}" if keyfile else f"certfile {certfile} (no keyfile given)"
    if b"ENCRYPTED" in key and password is None:
        raise ConfigError(f"{key_name}: the key is encrypted; give its password with key_password_file "
                          "or key_password_env")
    try:
        # The password, even when none is needed: without one OpenSSL would prompt on the terminal.
        context.load_cert_chain(certfile, keyfile, password="" if password is None else password)
    except ssl.SSLError as exc:
        raise ConfigError(_chain_problem(exc, cert, certfile, key_name)) from None


def _chain_problem(exc: ssl.SSLError, cert: bytes, certfile: str, key_name: str) -> str:
    if exc.reason == "KEY_VALUES_MISMATCH":
        return f"{key_name} does not hold the key of the certificate in certfile {certfile}"
    try:
        ssl.PEM_cert_to_DER_cert(cert.decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        return f"certfile {certfile} holds no PEM certificate ({exc.reason})"
    return f"{key_name} holds no usable PEM private key ({exc.reason}; a wrong password?)"


def _read(setting: str, path: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise ConfigError(f"setting {setting!r}: cannot read {path}: {(exc.strerror or str(exc)).lower()}") from None


class HandshakeStage:
    """The parking lot's TLS stage for a listener (rule 3)."""

    name = "TLS handshake"

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context

    def begin(self, conn: Connection) -> None:
        conn.sock.setblocking(False)
        if conn.sock.family in (socket.AF_INET, socket.AF_INET6):
            # TLS 1.3 sends its session tickets right after the handshake: without NODELAY the
            # first reply waits behind them for the client's delayed ACK (40 ms on Linux). Each
            # TLS write is a whole record already, so Nagle's coalescing has little left to do.
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            conn.sock = self.context.wrap_socket(conn.sock, server_side=True, do_handshake_on_connect=False)
        except OSError as exc:
            raise StageFailed("reset", str(exc), quiet=True) from None

    def step(self, conn: Connection) -> Waiting | None:
        sock = conn.sock
        assert isinstance(sock, ssl.SSLSocket)
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            return Waiting.READ
        except ssl.SSLWantWriteError:
            return Waiting.WRITE
        except OSError as exc:
            raise handshake_failure(exc) from None
        sock.setblocking(True)
        return None


def handshake_failure(exc: OSError) -> StageFailed:
    """What a failed handshake's exception says, as the stage's failure (rule 4): its kind is
    OpenSSL's reason, or what happened to the socket."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return StageFailed(f"client certificate refused: {exc.verify_message}")
    if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        return StageFailed("closed by the client", "before the handshake ended")
    if isinstance(exc, ssl.SSLError):
        # reason and library are set by OpenSSL's errors only: an SSLError made in Python has neither.
        return StageFailed(str(getattr(exc, "reason", None) or getattr(exc, "library", None) or "TLS error"), _short(exc))
    if isinstance(exc, (ConnectionResetError, BrokenPipeError)):
        return StageFailed("reset", str(exc), quiet=True)  # rule 4: nobody is left to tell
    return StageFailed("socket error", (exc.strerror or str(exc)).lower())


def _short(exc: ssl.SSLError) -> str:
    """The words of an SSLError without the '[SSL: X] ... (_ssl.c:1000)' wrapping."""
    text = str(exc.args[1]) if len(exc.args) > 1 else str(exc)
    return text.partition("] ")[2].rpartition(" (_ssl.c")[0] or text

