"""prefork: a pre-forking server runtime with a drop-in ``socketserver``. Runs in: both.

This module only re-exports; the implementation lives in private modules.
"""

from prefork.handlers import BaseRequestHandler, DatagramRequestHandler, StreamRequestHandler
from prefork.mixins import (
    ForkingMixIn,
    ForkingTCPServer,
    ForkingUDPServer,
    ForkingUnixDatagramServer,
    ForkingUnixStreamServer,
    ThreadingMixIn,
    TLSMixIn,
    ThreadingTCPServer,
    ThreadingUDPServer,
    ThreadingUnixDatagramServer,
    ThreadingUnixStreamServer,
)
from prefork.master import (
    PreforkMixIn,
    PreforkTCPServer,
    PreforkUDPServer,
    PreforkUnixDatagramServer,
    PreforkUnixStreamServer,
    serve,
)
from prefork.servers import BaseServer, TCPServer, UDPServer, UnixDatagramServer, UnixStreamServer

__version__ = "0.1.0"

__all__ = [
    "BaseRequestHandler",
    "BaseServer",
    "DatagramRequestHandler",
    "ForkingMixIn",
    "ForkingTCPServer",
    "ForkingUDPServer",
    "ForkingUnixDatagramServer",
    "ForkingUnixStreamServer",
    "PreforkMixIn",
    "PreforkTCPServer",
    "PreforkUDPServer",
    "PreforkUnixDatagramServer",
    "PreforkUnixStreamServer",
    "StreamRequestHandler",
    "TCPServer",
    "TLSMixIn",
    "ThreadingMixIn",
    "ThreadingTCPServer",
    "ThreadingUDPServer",
    "ThreadingUnixDatagramServer",
    "ThreadingUnixStreamServer",
    "UDPServer",
    "UnixDatagramServer",
    "UnixStreamServer",
    "__version__",
    "serve",
]
