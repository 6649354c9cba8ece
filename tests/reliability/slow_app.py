"""The app of the slow-client tests: the integration app's line commands, and greeting handlers.

- ``StreamHandler`` answers each line as tests.integration.apps does (``pid``, ``sleep S``, ...)
  and declares its message delimiter, so a worker waits for a whole first line before it.
- ``Greeter`` speaks first: it sends ``GREETING`` at once, then echoes lines, as SMTP or FTP do.
  It works only where the listener says so (``?first=server``); ``DeclaredGreeter`` says so itself.
"""

from __future__ import annotations

from prefork.handlers import StreamRequestHandler
from tests.integration.apps import StreamHandler as LineHandler

GREETING = b"220 hello\n"


class StreamHandler(LineHandler):
    message_delimiter = b"\n"


class Greeter(StreamRequestHandler):
    def handle(self) -> None:
        self.wfile.write(GREETING)
        for line in self.rfile:
            self.wfile.write(line)


class DeclaredGreeter(Greeter):
    server_speaks_first = True
