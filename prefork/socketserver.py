"""Drop-in replacement for the standard library's ``socketserver``. Runs in: both.

``import prefork.socketserver as socketserver`` gives code written for the stdlib the same public
names (``__all__`` equals the stdlib's on the running Python: 3.12 added the Forking Unix
servers), backed by prefork's from-scratch core. Nothing else is public here.
"""

import os as _os
import socket as _socket
import sys as _sys

from prefork.handlers import BaseRequestHandler, DatagramRequestHandler, StreamRequestHandler
from prefork.mixins import ThreadingMixIn, ThreadingTCPServer, ThreadingUDPServer
from prefork.servers import BaseServer, TCPServer, UDPServer

__all__ = [
    "BaseServer",
    "TCPServer",
    "UDPServer",
    "ThreadingUDPServer",
    "ThreadingTCPServer",
    "BaseRequestHandler",
    "StreamRequestHandler",
    "DatagramRequestHandler",
    "ThreadingMixIn",
]

if hasattr(_os, "fork"):
    from prefork.mixins import ForkingMixIn, ForkingTCPServer, ForkingUDPServer

    __all__ += ["ForkingUDPServer", "ForkingTCPServer", "ForkingMixIn"]

if hasattr(_socket, "AF_UNIX"):
    from prefork.mixins import ThreadingUnixDatagramServer, ThreadingUnixStreamServer
    from prefork.servers import UnixDatagramServer, UnixStreamServer

    __all__ += [
        "UnixStreamServer",
        "UnixDatagramServer",
        "ThreadingUnixStreamServer",
        "ThreadingUnixDatagramServer",
    ]
    if hasattr(_os, "fork") and _sys.version_info >= (3, 12):
        from prefork.mixins import ForkingUnixDatagramServer, ForkingUnixStreamServer

        __all__ += ["ForkingUnixStreamServer", "ForkingUnixDatagramServer"]
