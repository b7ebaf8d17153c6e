"""A slower network, simulated on one machine: relays on 127.0.0.1 that deliver every message
between two ranks a fixed delay after it was sent, and the ring hostfiles that route the ranks
through them (`bench-split --link-latency`).

MLX's ring backend has rank r listen on its own address and connect to rank r+1's, so each
rank gets its own hostfile: its own address as it is, every other rank's as a relay to it.
Every byte then crosses one relay per hop, in both directions, and arrives `delay` seconds
late: a collective pays the delay once per message step it waits for, as on a real link.
Each direction of a connection is a reader thread, which stamps what arrives, and a writer
thread, which sleeps until it is due (timed waits, no polling: the ranks keep the CPU).
"""

from __future__ import annotations

import collections
import contextlib
import json
import random
import socket
import threading
import time
from pathlib import Path

_CHUNK = 1 << 20
_CONNECT_S = 60.0  # how long a relay retries reaching a rank that is not listening yet
POLL_S = 0.005  # how often the delay is read from a control file


class _Direction:
    """One direction of a relayed connection: bytes read from `source` are written to `to`
    `link.delay` seconds after they arrived, in order."""

    def __init__(self, link: LinkEmulator, source: socket.socket, to: socket.socket):
        self.link, self.source, self.to = link, source, to
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.ready = threading.Condition()
        for work in (self._read, self._write):
            threading.Thread(target=work, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                data = self.source.recv(_CHUNK)
            except OSError:
                data = b""
            with self.ready:
                self.queue.append((time.perf_counter() + self.link.delay, data))
                self.ready.notify()
            if not data:  # closed: the close is passed on after the data before it
                return

    def _write(self) -> None:
        while True:
            with self.ready:
                while not self.queue:
                    self.ready.wait()
                due, data = self.queue[0]
                wait = due - time.perf_counter()
                if wait > 0:
                    self.ready.wait(wait)  # a timed wait: nothing else to do until then
                    continue
                self.queue.popleft()
            try:
                if not data:
                    self.to.shutdown(socket.SHUT_WR)
                    return
                self.to.sendall(data)
            except OSError:
                return


class LinkEmulator:
    """Relays that delay every message by `delay_s` seconds; `relay(port)` opens one to a rank's
    real port and returns the port to reach it through. With a `control` file, the delay is
    the milliseconds written in it, read every `POLL_S` seconds. A context manager."""

    def __init__(self, delay_s: float, control: Path | None = None):
        self.delay = delay_s
        self._control = control
        self._open: list[socket.socket] = []
        self._closed = threading.Event()
        if control is not None:
            threading.Thread(target=self._follow_control, daemon=True).start()

    def __enter__(self) -> LinkEmulator:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def relay(self, port: int) -> int:
        """Listen on a free port of 127.0.0.1; each connection is joined to `port`."""
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        self._open.append(server)
        threading.Thread(target=self._accept, args=(server, port), daemon=True).start()
        return server.getsockname()[1]

    def close(self) -> None:
        self._closed.set()
        for s in self._open:
            with contextlib.suppress(OSError):
                s.close()

    def _follow_control(self) -> None:
        while not self._closed.wait(POLL_S):
            with contextlib.suppress(OSError, ValueError):  # not written yet, or being written
                self.delay = float(self._control.read_text()) / 1000

    def _accept(self, server: socket.socket, port: int) -> None:
        while not self._closed.is_set():
            try:
                client, _ = server.accept()
            except OSError:
                return
            upstream = self._connect(port)
            if upstream is None:
                client.close()
                continue
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._open.append(s)
            _Direction(self, client, upstream)
            _Direction(self, upstream, client)

    @staticmethod
    def _connect(port: int) -> socket.socket | None:
        """The rank behind a relay (retrying while it is not listening yet)."""
        end = time.monotonic() + _CONNECT_S
        while time.monotonic() < end:
            try:
                return socket.create_connection(("127.0.0.1", port))
            except OSError:
                time.sleep(0.02)
        return None


def free_ports(n: int) -> int:
    """The first of `n` consecutive ports free on 127.0.0.1 (a launch's ring addresses)."""
    rng = random.Random()
    for _ in range(100):
        start = rng.randint(20000, 60000 - n)
        try:
            for port in range(start, start + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return start
        except OSError:
            continue
    raise OSError(f"no {n} consecutive free ports on 127.0.0.1")


def write_hostfiles(folder: Path, ports: list[int], relays: list[int] | None) -> list[Path]:
    """Ring hostfiles, one per rank: its own port as it is, the others' through `relays`
    (relays[r] leads to ports[r]); with no relays, one plain hostfile for all."""
    files = []
    for rank in range(len(ports)):
        hosts = [
            [f"127.0.0.1:{ports[r] if relays is None or r == rank else relays[r]}"]
            for r in range(len(ports))
        ]
        file = folder / f"hosts{rank}.json"
        file.write_text(json.dumps(hosts))
        files.append(file)
    return files
