"""A slower network, simulated on one machine: relays on 127.0.0.1 that deliver every message
between two ranks a fixed delay after it was sent, and the ring hostfiles that route the ranks
through them (`bench-split --link-latency`).

MLX's ring backend has rank r listen on its own address and connect to rank r+1's, so each
rank gets its own hostfile: its own address as it is, every other rank's as a relay to it.
Every byte then crosses one relay per hop, in both directions, and arrives `delay` seconds
late: a collective pays the delay once per message step it waits for, as on a real link.
One thread serves every relay (a selector and a queue of timed deliveries).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import json
import random
import selectors
import socket
import threading
import time
from pathlib import Path

_CHUNK = 1 << 20
_CONNECT_S = 60.0  # how long a relay retries reaching a rank that is not listening yet
_FINE_S = 0.002  # deliveries due sooner than this are waited for by polling ...
_POLL_S = 0.00005  # ... every 50 microseconds
POLL_S = 0.005  # how often the delay is read from a control file


class LinkEmulator:
    """Relays that delay every message by `delay_s` seconds; `relay(port)` opens one to a rank's
    real port and returns the port to reach it through. With a `control` file, the delay is
    the milliseconds written in it, read every `POLL_S` seconds. A context manager."""

    def __init__(self, delay_s: float, control: Path | None = None):
        self.delay = delay_s
        self._control, self._read_at = control, 0.0
        self._selector = selectors.DefaultSelector()
        self._due: list[tuple[float, int, socket.socket, bytes]] = []  # (time, seq, to, data)
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="link-emulator", daemon=True)
        self._thread.start()

    def __enter__(self) -> LinkEmulator:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def relay(self, port: int) -> int:
        """Listen on a free port of 127.0.0.1; each connection is joined to `port`."""
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        server.setblocking(False)
        with self._lock:
            self._open.append(server)
            self._selector.register(server, selectors.EVENT_READ, ("accept", port))
        return server.getsockname()[1]

    def close(self) -> None:
        self._closed = True
        self._thread.join(timeout=2)
        for s in self._open:
            s.close()

    # ------------------------------------------------------------------------ the loop
    def _join(self, client: socket.socket, port: int) -> None:
        """Connect to the rank behind a relay (retrying while it is not listening yet)."""
        end = time.monotonic() + _CONNECT_S
        while True:
            try:
                upstream = socket.create_connection(("127.0.0.1", port))
                break
            except OSError:
                if time.monotonic() > end:
                    client.close()
                    return
                time.sleep(0.02)
        with self._lock:
            for a, b in ((client, upstream), (upstream, client)):
                a.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                a.setblocking(False)
                self._open.append(a)
                self._selector.register(a, selectors.EVENT_READ, ("data", b))

    def _receive(self, source: socket.socket, to: socket.socket) -> None:
        try:
            data = source.recv(_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # closed: pass the close on, after the data before it
            with self._lock:
                self._selector.unregister(source)
        heapq.heappush(self._due, (time.perf_counter() + self.delay, next(self._seq), to, data))

    def _deliver(self) -> float | None:
        """Send what is due; the seconds until the next delivery (None: nothing queued)."""
        while self._due:
            due, _, to, data = self._due[0]
            wait = due - time.perf_counter()
            if wait > 0:
                return wait
            heapq.heappop(self._due)
            try:
                if data:
                    to.setblocking(True)
                    to.sendall(data)
                    to.setblocking(False)
                else:
                    to.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        return None

    def _follow_control(self) -> None:
        now = time.monotonic()
        if self._control is None or now - self._read_at < POLL_S:
            return
        self._read_at = now
        with contextlib.suppress(OSError, ValueError):  # not written yet, or being written
            self.delay = float(self._control.read_text()) / 1000

    def _loop(self) -> None:
        while not self._closed:
            self._follow_control()
            wait = self._deliver()
            # A selector waits in whole milliseconds: shorter waits poll and sleep finely.
            fine = wait is not None and wait < _FINE_S
            with self._lock:
                events = self._selector.select(0 if fine else min(wait or 0.05, 0.05))
            if fine and not events:
                time.sleep(min(wait, _POLL_S))
            for key, _ in events:
                what, other = key.data
                if what == "accept":
                    client, _ = key.fileobj.accept()
                    threading.Thread(target=self._join, args=(client, other), daemon=True).start()
                else:
                    self._receive(key.fileobj, other)


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
