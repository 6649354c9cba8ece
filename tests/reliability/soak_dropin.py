"""The drop-in ThreadingTCPServer, out of descriptors: ``python -m tests.reliability.soak_dropin``.

Binds 127.0.0.1 on port 0, prints the port on stdout, lowers its own soft RLIMIT_NOFILE to
soak_app.LOW_NOFILE and serves the soak app's commands with ``serve_forever()`` until killed.
Runs in: a process of its own, started by test_soak.py.
"""

from __future__ import annotations

import logging
import sys

from prefork.socketserver import ThreadingTCPServer
from tests.reliability import soak_app


class _Server(ThreadingTCPServer):
    daemon_threads = True  # the test kills the process; nothing waits for request threads
    request_queue_size = 128  # the connections the test holds beyond LOW_NOFILE wait here


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="[%(process)d] [%(levelname)s] %(name)s: %(message)s")
    with _Server(("127.0.0.1", 0), soak_app.StreamHandler) as server:
        print(server.server_address[1], flush=True)
        soak_app.low_nofile(None)
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
