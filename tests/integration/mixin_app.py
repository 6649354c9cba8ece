"""A socketserver-style program on PreforkMixIn: ``python -m tests.integration.mixin_app KIND PIDFILE``.

Prints the bound address as JSON on its first line, serves until a stop signal, and exits with
the master's exit code.
"""

from __future__ import annotations

import json
import os
import sys

import prefork
from prefork.socketserver import StreamRequestHandler


class PidEcho(StreamRequestHandler):
    def handle(self) -> None:
        line = self.rfile.readline().rstrip(b"\n")
        self.wfile.write(b"%d %s\n" % (os.getpid(), line))


class ThreadedPrefork(prefork.PreforkMixIn, prefork.ThreadingMixIn, prefork.TCPServer):
    pass


def main() -> int:
    kind, pidfile = sys.argv[1], sys.argv[2]
    cls = ThreadedPrefork if kind == "threaded" else prefork.PreforkTCPServer
    with cls(("127.0.0.1", 0), PidEcho, workers=2, pidfile=pidfile, name="mixin") as server:
        print(json.dumps(server.server_address), flush=True)
        server.serve_forever()
    return server.exit_code if server.exit_code is not None else 1


if __name__ == "__main__":
    sys.exit(main())
