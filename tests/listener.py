""""Bob's host": a plain TCP listener on loopback in a thread, recording what it receives, for the tests
reproducing attacks on outbound calls. It answers each request with ``response`` (bytes), sent whole or one
byte every ``drip`` seconds; or accepts and never answers (``silent``)."""

from __future__ import annotations

import socket
import threading
import time


class BobsHost:
    def __init__(self, response: bytes = b"", *, drip: float | None = None, silent: bool = False) -> None:
        self.response = response or (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
        )
        self.drip = drip
        self.silent = silent
        self.received: list[bytes] = []
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self.port = self._sock.getsockname()[1]
        self._stopped = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def connections(self) -> int:
        return len(self.received)

    def _serve(self) -> None:
        while not self._stopped.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
                    while len(body) < length:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        body += chunk
            self.received.append(head + b"\r\n\r\n" + body)
            if self.silent:
                self._stopped.wait(30)
                return
            if self.drip is None:
                conn.sendall(self.response)
            else:
                for index in range(len(self.response)):
                    if self._stopped.is_set():
                        return
                    conn.sendall(self.response[index:index + 1])
                    time.sleep(self.drip)
        except OSError:
            pass
        finally:
            conn.close()

    def stop(self) -> None:
        self._stopped.set()
        self._sock.close()


def closed_port() -> int:
    """A loopback port nothing listens on."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def drip_response(body: bytes, content_type: bytes = b"application/json") -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: " + content_type + b"\r\nContent-Length: "
        + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body
    )
