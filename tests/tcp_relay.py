"""A TCP relay on loopback that keeps every byte each way: what really crossed the network, ZMTP and all."""

from __future__ import annotations

import socket
import threading


class TcpRelay:
    """Listens on a free 127.0.0.1 port (`endpoint`) and relays each connection to `target` (tcp://host:port)."""

    def __init__(self, target: str):
        host, port = target.removeprefix("tcp://").rsplit(":", 1)
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"
        self.up, self.down = bytearray(), bytearray()  # edge -> cloud, cloud -> edge
        self.links: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                edge, _ = self.listener.accept()
            except OSError:
                return
            cloud = socket.create_connection(self.target)
            self.links += [edge, cloud]
            threading.Thread(target=self._pump, args=(edge, cloud, self.up), daemon=True).start()
            threading.Thread(target=self._pump, args=(cloud, edge, self.down), daemon=True).start()

    def _pump(self, src, dst, kept: bytearray):
        try:
            while data := src.recv(1 << 16):
                kept += data  # kept before it is passed on
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _shut(dst)  # either side gone: the other sees the connection drop, and the other pump stops

    def cut(self):
        """Drop the connections relayed so far, as a failing network would; new ones are relayed again."""
        for s in self.links:
            _shut(s)

    def close(self):
        for s in [self.listener, *self.links]:
            _shut(s)
            s.close()


def _shut(s: socket.socket) -> None:
    """Shut `s` down both ways; a thread blocked reading it wakes (closing it would not wake that thread)."""
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:  # already shut, or never connected
        pass
