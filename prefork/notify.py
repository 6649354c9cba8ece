"""sd_notify without libsystemd: tell the service manager how the master is doing. Runs in: master.

Rules:

1. The protocol is one datagram of newline-separated ``KEY=VALUE`` fields sent to the
   AF_UNIX socket named by ``$NOTIFY_SOCKET``; a name starting with ``@`` is in the abstract
   namespace. Without ``$NOTIFY_SOCKET`` (not under systemd) every call is a no-op returning False.
2. Notifying never takes the server down: a failure to send is logged at debug level and
   reported as False, never raised.
3. The environment is read at each call, never at import time, so tests (and a master that
   re-executes itself) see the current value.
4. systemd accepts messages only from the service's main pid unless ``NotifyAccess=all``:
   after an upgrade in place, the *old* master (still the main pid) should send
   ``mainpid(new_pid)``, or the unit needs ``NotifyAccess=all`` for the new one to do it.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Mapping

__all__ = ["notify", "ready", "reloading", "stopping", "status", "mainpid", "monotonic_usec"]

log = logging.getLogger("prefork.notify")

# A notification is a few bytes to a local socket; if the service manager's queue is full for
# this long something is badly wrong there, and the master's loop must not stall on it.
_SEND_TIMEOUT = 1.0


def notify(*fields: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send *fields* (``"READY=1"``, ...) as one message; True if it was sent."""
    env = os.environ if environ is None else environ
    name = env.get("NOTIFY_SOCKET", "")
    if not name:
        return False
    address = _socket_address(name)
    if address is None:
        log.debug("not notifying: NOTIFY_SOCKET=%r is neither a path nor an abstract name", name)
        return False
    return _send(address, "\n".join(fields).encode("utf-8"))


def ready(status: str = "", *, environ: Mapping[str, str] | None = None) -> bool:
    """The service is up: its listeners are bound and its workers accept."""
    return notify("READY=1", *_status_field(status), environ=environ)


def reloading(status: str = "", *, environ: Mapping[str, str] | None = None) -> bool:
    """A reload (HUP) began; send ``ready()`` when it is done.

    systemd (>= 253, ``Type=notify-reload``) requires MONOTONIC_USEC with RELOADING=1, to tell
    this reload from an older one.
    """
    fields = ("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}", *_status_field(status))
    return notify(*fields, environ=environ)


def stopping(status: str = "", *, environ: Mapping[str, str] | None = None) -> bool:
    """The service is shutting down."""
    return notify("STOPPING=1", *_status_field(status), environ=environ)


def status(text: str, *, environ: Mapping[str, str] | None = None) -> bool:
    """A one-line status for ``systemctl status``."""
    return notify(*_status_field(text), environ=environ)


def mainpid(pid: int, *, environ: Mapping[str, str] | None = None) -> bool:
    """The service's main process is now *pid* (after an upgrade in place)."""
    return notify(f"MAINPID={pid:d}", environ=environ)


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, the clock systemd compares MONOTONIC_USEC with."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def _status_field(text: str) -> tuple[str, ...]:
    # A newline would end the field and start another: STATUS must not be able to send READY=1.
    return (f"STATUS={' '.join(text.splitlines())}",) if text else ()


def _socket_address(name: str) -> str | None:
    if name.startswith("@"):
        return "\0" + name[1:]
    return name if name.startswith("/") else None


def _send(address: str, message: bytes) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.settimeout(_SEND_TIMEOUT)
            sock.sendto(message, address)
    except OSError as exc:
        # Swallowed on purpose (rule 2): no service manager is worth a failed start or stop.
        log.debug("cannot notify %r: %s", address, exc)
        return False
    return True
