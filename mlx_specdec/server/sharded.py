"""`serve --sharding`: the server on rank 0, every other rank following its generations.

Rank 0 runs the HTTP server and a `ShardedEngine`. Before each generation it sends the
request (token ids and options, with a seed drawn when the request has none) to the other
ranks, which run the same generation in step (`follow`); after each round it sends whether
the generation goes on, so that a client that leaves stops every rank at the same round (one
small all-sum per round). An empty request tells the followers that the server stopped.
Batched rounds and the prefix cache are off here: ranks would need to agree on them too.
"""

from __future__ import annotations

import contextlib
import pickle
import secrets
import threading
from typing import Any

from ..distributed import broadcast_bytes, broadcast_int
from ..errors import SpecDecError
from ..generate import stream_speculative_generate
from .engine import Engine, Job


def _announce(group: Any, request: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Rank 0's next request on every rank (None: the server stopped). Pickled: it goes from
    one of the job's own processes to the others, never from a client."""
    data = broadcast_bytes(group, pickle.dumps(request) if request is not None else b"")
    return pickle.loads(data) if data else None


def _idle(target: Any) -> contextlib.AbstractContextManager:
    """Waiting for the next request has no bound: the rank's watchdog looks away."""
    watchdog = getattr(target, "watchdog", None)
    return watchdog.idle() if watchdog is not None else contextlib.nullcontext()


class _InStep:
    """`job` as rank 0's engine sees it while generating: after each chunk, every rank learns
    whether the generation goes on, and the engine stops exactly when the others do."""

    def __init__(self, job: Job, group: Any):
        self._job, self._group = job, group
        self.cancel = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._job, name)

    def put(self, item: Any) -> None:
        self._job.put(item)
        if not broadcast_int(self._group, int(not self._job.cancel.is_set())):
            self.cancel.set()


class ShardedEngine(Engine):
    """Rank 0's engine: each generation is announced to the other ranks and run in step."""

    def start(self) -> None:
        super().start()
        if getattr(self.target, "watchdog", None) is not None:
            self.target.watchdog.watch(self._thread)  # the thread that makes collectives

    def _next(self) -> Job | None:
        with _idle(self.target):
            job = super()._next()
        if job is None:
            _announce(self.target.group)  # stopped: the followers end too
        return job

    def _generate(self, job: Job) -> Any:
        options = dict(job.options)
        if options.get("seed") is None:  # every rank draws the same numbers
            options["seed"] = secrets.randbits(31)
        job.options = options
        _announce(self.target.group, {"ids": job.ids, "options": options})
        return super()._generate(_InStep(job, self.target.group))


def follow(target: Any, tokenizer: Any, drafter: Any, max_draft: int | None) -> int:
    """A rank other than 0: run each generation rank 0 announces, until it stops."""
    group = target.group
    while True:
        with _idle(target):
            request = _announce(group)
        if request is None:
            return 0
        stream = stream_speculative_generate(
            target, tokenizer, drafter, request["ids"], max_draft=max_draft, **request["options"]
        )
        try:
            for chunk in stream:
                if chunk.result is not None or not broadcast_int(group, 1):
                    break
        except SpecDecError:
            continue  # rank 0 met the same error and answered its client with it
        finally:
            stream.close()
