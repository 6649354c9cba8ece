"""A service for test_allow.py: the integration apps' handlers behind server classes whose own
``verify_request`` writes each client it is asked about to $ALLOW_APP_LOG and refuses 127.0.0.3.

So a test can tell the allow-list's refusals (the app never hears of the client) from the app's
own (the client is in the file, and still refused).
"""

from __future__ import annotations

import os
from typing import Any

from prefork.servers import TCPServer, UDPServer
from tests.integration.apps import DatagramHandler, StreamHandler

__all__ = ["StreamHandler", "DatagramHandler", "server_class", "datagram_server_class"]

# The client the app itself refuses.
APP_REFUSES = "127.0.0.3"


def _app_verifies(client_address: Any) -> bool:
    host = client_address[0]
    with open(os.environ["ALLOW_APP_LOG"], "a", encoding="utf-8") as log:
        log.write(f"{host}\n")
    return host.removeprefix("::ffff:") != APP_REFUSES


class VerifyingTCPServer(TCPServer):
    def verify_request(self, request: Any, client_address: Any) -> bool:
        return _app_verifies(client_address)


class VerifyingUDPServer(UDPServer):
    def verify_request(self, request: Any, client_address: Any) -> bool:
        return _app_verifies(client_address)


server_class = VerifyingTCPServer
datagram_server_class = VerifyingUDPServer
