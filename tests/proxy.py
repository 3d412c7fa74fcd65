"""A small TCP proxy on 127.0.0.1 in front of a real Pushgateway, for fault tests.

Modes, switchable at any time (each new connection takes the current one):
  * forward: bytes both ways, the answer optionally ``delay`` seconds late;
  * fail with an HTTP status (``fail_status = 500``): every request on the
    connection is read and answered with that status, connection closed;
  * ``hold``: requests are read and not answered until ``hold`` is cleared.
It records what clients sent (``sent``) so tests can check headers.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

from gateway import free_port


class Proxy:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.delay = 0.0
        self.fail_status: int | None = None
        self.hold = threading.Event()  # set: hold every answer
        self.connections = 0
        self.requests = 0
        self.held = 0  # requests currently held
        self.sent = bytearray()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sock = socket.create_server(("127.0.0.1", self.port))
        self._sock.settimeout(0.2)
        threading.Thread(target=self._accept, daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        self.hold.clear()
        self._sock.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            with self._lock:
                self.connections += 1
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _read_request(self, client: socket.socket) -> bytes | None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = client.recv(65536)
            if not chunk:
                return None
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        while len(body) < length:
            chunk = client.recv(65536)
            if not chunk:
                return None
            body += chunk
        return head + b"\r\n\r\n" + body

    def _serve(self, client: socket.socket) -> None:
        with contextlib.closing(client):
            client.settimeout(30)
            # no Nagle: a client that writes a request's head and body apart
            # would otherwise wait for a delayed ACK (40 ms) on every request
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                if self.fail_status is not None or self.hold.is_set():
                    self._answer_locally(client)
                else:
                    self._forward(client)
            except OSError:
                pass

    def _answer_locally(self, client: socket.socket) -> None:
        while not self._stop.is_set():
            request = self._read_request(client)
            if request is None:
                return
            with self._lock:
                self.requests += 1
                self.sent += request[:4096]
                self.held += 1
            try:
                while self.hold.is_set() and not self._stop.is_set():
                    time.sleep(0.01)
            finally:
                with self._lock:
                    self.held -= 1
            status = self.fail_status or 503
            body = b"injected failure"
            client.sendall(f"HTTP/1.1 {status} Injected\r\nContent-Length: {len(body)}\r\n"
                           "Connection: close\r\n\r\n".encode() + body)
            return

    def _forward(self, client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=30)
        upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with contextlib.closing(upstream):
            def up() -> None:
                with contextlib.suppress(OSError):
                    while chunk := client.recv(65536):
                        with self._lock:
                            self.requests += chunk.count(b" HTTP/1.1\r\n")
                            if len(self.sent) < 1 << 20:
                                self.sent += chunk[:4096]
                        upstream.sendall(chunk)
                with contextlib.suppress(OSError):
                    upstream.shutdown(socket.SHUT_WR)

            t = threading.Thread(target=up, daemon=True)
            t.start()
            while chunk := upstream.recv(65536):
                if self.delay:
                    time.sleep(self.delay)
                client.sendall(chunk)
            t.join(1)
