"""The one generation worker: a thread that owns MLX and serves requests in arrival order.

With `max_batch` > 1 the worker runs batched speculative rounds (`batch.BatchDecoder`): up to
that many requests decode together, new ones join between rounds (their prefill chunked), and
a cancelled one leaves at the next round. Each request's tokens are what it gets alone (exact
on the CPU backend, see batch.py); the prefix cache is not used there.

HTTP handlers (on the asyncio loop) submit a `Job` and read its results from an asyncio queue;
setting `job.cancel` (client gone, stop sequence seen) ends the generation at the next round.
A handler whose client leaves while its job still waits takes the job back out of the line
(`withdraw`). `drain` starts a shutdown: waiting jobs are answered with `EngineClosed`, the
running one is cut after a grace period.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..batch import BatchDecoder
from ..drafters.base import Drafter
from ..errors import SpecDecError
from ..generate import GenerationResult, stream_speculative_generate
from ..loading import PairConfig
from ..prefix_cache import PrefixCache
from ..speculate import Round
from ..target import Target
from .batching import RowStream, batchable, make_request

log = logging.getLogger("mlx_specdec.server")


class EngineBusy(Exception):
    """The waiting line is full; `retry_after` is a guess in seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__("the server is busy: too many requests are waiting")
        self.retry_after = retry_after


class EngineClosed(Exception):
    """The server is shutting down: the job was not run, or was cut short."""

    def __init__(self) -> None:
        super().__init__("the server is shutting down")


class JobCancelled(Exception):
    """The job was cancelled before it started (its client left)."""


class Metrics:
    """Prometheus series, in a registry of their own (one per app, so tests can run several)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "specdec_requests",
            "Requests by endpoint and outcome",
            ["endpoint", "outcome"],
            registry=r,
        )
        self.prompt_tokens = Counter("specdec_prompt_tokens", "Prompt tokens", registry=r)
        self.generated_tokens = Counter("specdec_generated_tokens", "Generated tokens", registry=r)
        self.accept_length = Histogram(
            "specdec_accept_length",
            "Tokens committed per verify round (accepted drafts + 1)",
            buckets=[1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32],
            registry=r,
        )
        self.decode_tps = Histogram(
            "specdec_decode_tokens_per_second",
            "Decode speed per request",
            buckets=[1, 5, 10, 20, 40, 60, 80, 100, 150, 200, 300, 500, 1000],
            registry=r,
        )
        self.queued = Gauge("specdec_queue_depth", "Requests waiting for the engine", registry=r)
        self.busy = Gauge("specdec_busy", "1 while a request is generating", registry=r)
        self.batch_size = Gauge(
            "specdec_batch_size", "Requests decoding together (--max-batch)", registry=r
        )
        self.round_rows = Histogram(
            "specdec_round_rows",
            "Requests sharing each batched step",
            buckets=[1, 2, 4, 8, 16, 32, 64],
            registry=r,
        )
        self.prefix_lookups = Counter(
            "specdec_prefix_cache_lookups",
            "Prefix cache lookups by outcome (hit, miss, unsupported, off)",
            ["outcome"],
            registry=r,
        )
        self.cached_prompt_tokens = Counter(
            "specdec_cached_prompt_tokens", "Prompt tokens served from the prefix cache", registry=r
        )
        self.prefix_bytes = Gauge(
            "specdec_prefix_cache_bytes", "Bytes the prefix cache holds", ["tier"], registry=r
        )

    def count(self, endpoint: str, outcome: str) -> None:
        """One finished request: ok, disconnected, rejected (busy), invalid, error, shutdown."""
        self.requests.labels(endpoint, outcome).inc()

    def watch(self, prefix_cache: PrefixCache) -> None:
        """Report the cache's size at every scrape."""
        for tier in ("ram", "disk"):
            gauge = self.prefix_bytes.labels(tier)
            gauge.set_function(lambda tier=tier: prefix_cache.stats()[f"{tier}_bytes"])


@dataclass
class Job:
    """One request's generation. Items on `out`: `GenerationChunk`s, then a final
    `GenerationResult` or an exception. `shutdown` is set when a shutdown cut it short."""

    ids: list[int]
    options: dict[str, Any]
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    shutdown: bool = False

    def put(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
        except RuntimeError:  # the event loop is gone (server shutting down): nobody listens
            self.cancel.set()

    def cut(self) -> None:
        """End the generation at its next round because the server is shutting down."""
        self.shutdown = True
        self.cancel.set()


class Engine:
    """A loaded target/drafter pair behind a bounded first-come-first-served line."""

    def __init__(
        self,
        target: Target,
        tokenizer: Any,
        drafter: Drafter | None,
        config: PairConfig,
        *,
        max_queue: int = 16,
        max_draft: int | None = None,
        prefix_cache: PrefixCache | None = None,
        max_batch: int = 1,
        cap_for: Any = None,
    ) -> None:
        if max_queue < 1:
            raise SpecDecError(f"--max-queue must be >= 1, got {max_queue}")
        if max_batch < 1:
            raise SpecDecError(f"--max-batch must be >= 1, got {max_batch}")
        # Batched rounds (`_work_batched`); refused at start for what they do not cover.
        self.max_batch, self.cap_for = max_batch, cap_for
        self._decoder = BatchDecoder(target, drafter, cap_for=cap_for) if max_batch > 1 else None
        self.target, self.tokenizer, self.drafter, self.config = target, tokenizer, drafter, config
        self.max_draft = max_draft
        self.prefix_cache = prefix_cache
        self.metrics = Metrics()
        if prefix_cache is not None:
            self.metrics.watch(prefix_cache)
        self.max_queue = max_queue
        self._waiting: deque[Job] = deque()
        self._line = threading.Condition()  # guards _waiting, _running, closing, _stopped
        self._running: Job | None = None
        self._rows: dict[int, tuple[Job, RowStream]] = {}  # batched: uid -> its job, stream
        self.closing = False  # no new jobs: a shutdown has begun
        self._stopped = False  # the worker ends once the line is empty
        self._mean_seconds = 1.0  # running mean of a request's duration, for Retry-After
        self.busy = False
        work = self._work if max_batch == 1 else self._work_batched
        self._thread = threading.Thread(target=work, name="specdec-engine", daemon=True)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def queued(self) -> int:
        return len(self._waiting)

    def start(self) -> None:
        self._thread.start()

    def submit(self, ids: list[int], options: dict[str, Any]) -> Job:
        job = Job(ids, options, asyncio.get_running_loop())
        with self._line:
            if self.closing:
                raise EngineClosed()
            if len(self._waiting) >= self.max_queue:
                wait = self._mean_seconds * (len(self._waiting) + 1)
                raise EngineBusy(max(1, math.ceil(wait)))
            self._waiting.append(job)
            self._line.notify()
        self.metrics.queued.set(self.queued)
        return job

    def withdraw(self, job: Job) -> None:
        """Cancel `job`; if it still waits, it leaves the line (its place is free at once)."""
        job.cancel.set()
        with self._line:
            if job in self._waiting:
                self._waiting.remove(job)
        self.metrics.queued.set(self.queued)

    def drain(self, grace: float = 0.0) -> None:
        """Begin a shutdown: refuse new jobs, answer the waiting ones with `EngineClosed`, and
        cut the running one after `grace` seconds if it has not ended by then."""
        with self._line:
            self.closing = True
            waiting = list(self._waiting)
            running = [self._running] if self._running else [j for j, _ in self._rows.values()]
            self._waiting.clear()
        self.metrics.queued.set(0)
        for job in waiting:
            job.cancel.set()
            job.put(EngineClosed())
        for job in running:
            if grace > 0:
                timer = threading.Timer(grace, job.cut)
                timer.daemon = True  # never what keeps the process alive
                timer.start()
            else:
                job.cut()

    def stop(self, timeout: float = 1.0) -> None:
        """Drain at once and let the worker end (waiting at most `timeout` seconds for it)."""
        self.drain()
        with self._line:
            self._stopped = True
            self._line.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout)

    def _next(self) -> Job | None:
        with self._line:
            while not self._waiting and not self._stopped:
                self._line.wait()
            if not self._waiting:
                return None
            self._running = self._waiting.popleft()
            return self._running

    def _work(self) -> None:
        while (job := self._next()) is not None:
            self.metrics.queued.set(self.queued)
            if job.cancel.is_set():  # gave up while waiting
                job.put(JobCancelled())
                continue
            self.busy = True
            self.metrics.busy.set(1)
            started = time.perf_counter()
            try:
                job.put(self._generate(job))
            except SpecDecError as e:
                job.put(e)
            except Exception as e:  # noqa: BLE001 - one bad request must not stop the server
                log.exception("generation failed")
                job.put(e)
            finally:
                with self._line:
                    self._running = None
                self.busy = False
                self.metrics.busy.set(0)
                self._mean_seconds = 0.8 * self._mean_seconds + 0.2 * (
                    time.perf_counter() - started
                )

    # ------------------------------------------------------------------ batched
    def _admit(self) -> list[Job] | None:
        """The waiting jobs that fit in the batch now (waits while nothing runs or waits);
        None once stopped with nothing left."""
        with self._line:
            while not self._waiting and not self._rows and not self._stopped:
                self._line.wait()
            if not self._waiting and not self._rows:
                return None
            jobs = []
            while self._waiting and len(self._rows) + len(jobs) < self.max_batch:
                jobs.append(self._waiting.popleft())
            return jobs

    def _start_row(self, job: Job) -> None:
        if job.cancel.is_set():  # gave up while waiting
            job.put(JobCancelled())
            return
        if not batchable(job.options):  # an option batched rounds lack: run it alone
            self._running = job
            try:
                job.put(self._generate(job))
            except Exception as e:  # noqa: BLE001 - one bad request must not stop the server
                job.put(e)
            finally:
                self._running = None
            return
        eos = set(self.tokenizer.eos_token_ids)
        mode = self.drafter.kind if self.drafter else "baseline"
        try:
            request = make_request(job.ids, job.options, eos, self.max_draft)
            uid = self._decoder.add(request)
        except SpecDecError as e:
            job.put(e)
            return
        with self._line:
            lead = job.options.get("leading_space", False)
            self._rows[uid] = (job, RowStream(self.tokenizer, request, mode, lead))

    def _end_row(self, uid: int, cancelled: bool = False, error: Exception | None = None) -> None:
        self._decoder.drop(uid)
        with self._line:
            job, stream = self._rows.pop(uid)
        if error is not None:
            job.put(error)
            return
        last, result = stream.finish(cancelled)
        self._record(result)
        if last.text and not cancelled:  # what the detokenizer held to the end (see _generate)
            job.put(replace(last, result=None))
        job.put(result)
        seconds = result.prefill_seconds + result.decode_seconds
        self._mean_seconds = 0.8 * self._mean_seconds + 0.2 * seconds

    def _work_batched(self) -> None:
        """Admit waiting jobs up to `max_batch`, drop cancelled rows, run one step (a prefill
        chunk of a joining request, then a round of every decoding row), stream what it
        committed; repeat."""
        while (jobs := self._admit()) is not None:
            self.metrics.queued.set(self.queued)
            for job in jobs:
                self._start_row(job)
            for uid, (job, _) in list(self._rows.items()):
                if job.cancel.is_set():  # client gone, stop sequence seen, shutdown
                    self._end_row(uid, cancelled=True)
            self._show_rows()
            if self._rows:
                self._step()
                self._show_rows()

    def _step(self) -> None:
        self.metrics.round_rows.observe(len(self._rows))
        try:
            events = self._decoder.step()
        except Exception as e:  # noqa: BLE001 - the batch fails, the server goes on
            log.exception("batched generation failed")
            for uid in list(self._rows):
                self._end_row(uid, error=e)
            return
        for event in events:
            job, stream = self._rows[event.uid]
            job.put(stream.add(event))
            if event.finished:
                self._end_row(event.uid)

    def _show_rows(self) -> None:
        self.busy = bool(self._rows)
        self.metrics.busy.set(int(self.busy))
        self.metrics.batch_size.set(len(self._rows))

    def _generate(self, job: Job) -> GenerationResult:
        """Stream chunks to the job; on cancel, close the generator (no further round runs) and
        build the result from what was committed so far."""
        tokens: list[int] = []
        rounds: list[Round] = []
        t0 = time.perf_counter()
        t_first = None
        stream = stream_speculative_generate(
            self.target,
            self.tokenizer,
            self.drafter,
            job.ids,
            max_draft=self.max_draft,
            prefix_cache=self.prefix_cache,
            **job.options,
        )
        try:
            for chunk in stream:
                if chunk.result is not None:
                    result = chunk.result
                    # The last chunk carries the text the detokenizer held to the end (a
                    # character's first bytes, a lone space): the answer's end, sent before.
                    if chunk.text:
                        job.put(replace(chunk, result=None))
                    break
                t_first = t_first or time.perf_counter()
                tokens += chunk.tokens
                if chunk.round is not None:
                    rounds.append(chunk.round)
                job.put(chunk)
                if job.cancel.is_set():
                    now = time.perf_counter()
                    result = GenerationResult(
                        "",
                        tokens,
                        rounds,
                        len(job.ids),
                        t_first - t0,
                        now - t_first,
                        "stop",
                        self.drafter.kind if self.drafter else "baseline",
                        **chunk.cache_info,
                    )
                    break
        finally:
            stream.close()
        self._record(result)
        return result

    def _record(self, result: GenerationResult) -> None:
        m = self.metrics
        m.prompt_tokens.inc(result.prompt_tokens)
        m.prefix_lookups.labels(result.prefix_cache).inc()
        m.cached_prompt_tokens.inc(result.cached_tokens)
        m.generated_tokens.inc(len(result.tokens))
        for r in result.rounds:
            m.accept_length.observe(len(r.committed))
        if result.decode_seconds > 0:
            m.decode_tps.observe(result.tokens_per_sec)
