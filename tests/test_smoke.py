import prefork.socketserver as socketserver
from tests.support import serving, stream_request


class Upper(socketserver.StreamRequestHandler):
    def handle(self):
        self.wfile.write(self.rfile.readline().upper())


def test_tcp_echo():
    with serving(socketserver.TCPServer(("127.0.0.1", 0), Upper)) as server:
        assert stream_request(server.server_address, b"hi\n") == b"HI\n"
    assert server.socket.fileno() == -1
