"""Batched speculative rounds: many requests share each drafter call and each verify forward.

The one-sequence loop is `speculate.py`; this is the same round over B rows, each a request with
its own prompt, accepted length, rollback, sampling parameters, stop tokens, budget, drafter state
and random stream. A round:

1. row r drafts n_r = min(its cap, tokens left - 1) tokens after its anchor (its newest token);
   the parallel drafters draft every row in one forward (`drafters/batched.py`), others row by
   row;
2. the target verifies [anchor, drafts] of every row in one forward (`rows.forward_rows`), each
   row over its own KV cache and its own n_r + 1 positions;
3. chain verification per row (greedy rows at once, sampled rows each on its own stream), one
   host sync for the whole round, then each row's cache is rolled back to what it committed.

Requests join between rounds: a joining prompt is prefilled one chunk per step, so the rows
already decoding wait at most one chunk's forward (`prefill_chunk`) for their next round.

Exactness: with row-invariant matmuls (MLX's CPU backend) a row's round computes bitwise what it
computes alone, and its draws come from its own `RowRNG`: each request's tokens are those of the
same request run alone, whoever shares its rounds (tests/test_batch.py). Greedy rows are also
the tokens of `speculate`. Dense targets only (`rows.refusal`).
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from .drafters import batched as drafting
from .errors import SpecDecError
from .rows import BatchKV, RowRNG, forward_rows, make_row_cache, prepare
from .sampling import SamplingParams, sample, verify
from .speculate import Round, check_max_draft
from .target import PREFILL_STEP, Target


@dataclass
class Request:
    """One sequence to generate: as `speculate`'s arguments. `max_draft` None is the drafter's
    whole block. `seed` None draws a fresh stream."""

    ids: Sequence[int]
    max_new_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    eos_ids: Collection[int] = ()
    max_draft: int | None = None


@dataclass
class Event:
    """What a step did for one request: the tokens it committed (the first token, with round
    None, when its prefill ends) and whether the request is done."""

    uid: int
    tokens: list[int]
    round: Round | None
    finished: bool


@dataclass
class _Row:
    uid: int
    request: Request
    cap: int
    cache: list[Any] | None  # its own, while its prompt is prefilled (then in the batch's)
    state: list[Any]
    rng: RowRNG
    prompt: mx.array
    ends: list[int]  # where the remaining prefill chunks end
    prefilled: int = 0  # prompt tokens in the cache
    taps: list[mx.array] = field(default_factory=list)  # prefill taps so far
    produced: int = 0
    context: mx.array | None = None  # taps the drafter has not read yet
    next_tokens: mx.array | None = None  # the token after each of those positions

    @property
    def decoding(self) -> bool:
        return not self.ends

    def draft_count(self, cap: int | None) -> int:
        """n for this round: the row's cap (or the batch's, when lower and the row's draws do
        not depend on it: greedy or unseeded), within the tokens left."""
        p = self.request.params
        own_stream = not p.greedy and p.seed is not None
        mine = self.cap if cap is None or own_stream else min(cap, self.cap)
        return max(0, min(mine, self.request.max_new_tokens - self.produced - 1))


def _chunk_ends(n: int, chunk: int) -> list[int]:
    """Prefill chunk ends as `Target.prefill` has them for a dense target (chunk = 512)."""
    return list(range(chunk, n, chunk)) + [n]


class BatchDecoder:
    """Rows of requests stepped together. `add` queues a request (its prefill starts at the next
    `step`), `drop` removes it at once, `step` runs one prefill chunk of the oldest joining
    request, then one round of every decoding row, and returns what each request got.

    `cap_for(batch_size)` (optional) lowers the drafts per round for a batch of that size, down
    to 0 (plain batched decoding); a seeded sampled row keeps its own cap, so its draws stay
    those of its solo run."""

    def __init__(
        self,
        target: Target,
        drafter: Any,
        *,
        prefill_chunk: int = PREFILL_STEP,
        cap_for: Callable[[int], int | None] | None = None,
    ) -> None:
        prepare(target)
        if prefill_chunk < 1:
            raise SpecDecError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.target, self.drafter = target, drafter
        self.prefill_chunk, self.cap_for = prefill_chunk, cap_for
        self.rows: dict[int, _Row] = {}
        self.kv: list[BatchKV] = []  # the target's caches of the decoding rows, in `order`
        self.order: list[int] = []
        self._uids = itertools.count()
        self._batched = drafter is not None and drafting.batched(drafter)

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, request: Request, uid: int | None = None) -> int:
        if not request.ids:
            raise SpecDecError("the prompt is empty: give at least one token")
        if request.max_new_tokens < 1:
            raise SpecDecError(f"max_new_tokens must be >= 1, got {request.max_new_tokens}")
        cap = 0 if self.drafter is None else check_max_draft(request.max_draft, self.drafter)
        uid = next(self._uids) if uid is None else uid
        seed = request.params.seed
        self.rows[uid] = _Row(
            uid,
            request,
            cap,
            make_row_cache(self.target),
            [] if self.drafter is None else self.drafter.new_state(False),
            RowRNG(secrets.randbits(63) if seed is None else seed),
            mx.array(list(request.ids), dtype=mx.int32),
            _chunk_ends(len(request.ids), self.prefill_chunk),
        )
        return uid

    def drop(self, uid: int) -> None:
        """Forget a request now (cancelled, client gone): its row is free for the next step."""
        self.rows.pop(uid, None)
        if uid in self.order:
            keep = [i for i, u in enumerate(self.order) if u != uid]
            for kv in self.kv:
                kv.keep(keep)
            self.order.remove(uid)

    def _join(self, row: _Row) -> None:
        """A prefilled row's cache joins the batch's."""
        if not self.kv:
            self.kv = [BatchKV() for _ in row.cache]
        for kv, c in zip(self.kv, row.cache):
            kv.append(c)
        mx.eval([kv.state for kv in self.kv])
        self.order.append(row.uid)
        row.cache = None

    def step(self) -> list[Event]:
        events = []
        joining = next((r for r in self.rows.values() if not r.decoding), None)
        if joining is not None:
            events += self._prefill(joining)
            self._forget(events)
        if self.order:
            events += self._round([self.rows[u] for u in self.order])
            self._forget(events)
        return events

    def _forget(self, events: list[Event]) -> None:
        for e in events:
            if e.finished:
                self.drop(e.uid)

    # ------------------------------------------------------------------ prefill
    def _prefill(self, row: _Row) -> list[Event]:
        """One chunk of `row`'s prompt (as `Target.prefill` does it); after the last, its first
        token."""
        start, end = row.prefilled, row.ends.pop(0)
        row.prefilled = end
        logits, taps = self.target(row.prompt[start:end], row.cache, last_only=True)
        if taps is not None and self._batched:  # the drafter reads the chunk now
            drafting.ingest(self.drafter, row.state, taps)
            taps = taps[:0]
        if taps is not None:
            row.taps.append(taps)
        held = row.cache + (row.state if self._batched else [])
        mx.eval([c.state for c in held] + row.taps[-1:] + [logits])
        if row.ends:
            return []
        params = row.request.params
        with row.rng:
            first = sample(logits[-1][None], params).astype(mx.int32)
        token = first.item()
        row.produced = 1
        done = token in row.request.eos_ids or row.request.max_new_tokens <= 1
        row.context = mx.concatenate(row.taps, axis=0) if row.taps else None
        row.taps = []
        row.next_tokens = mx.concatenate([row.prompt[1:], first])
        if not done:
            self._join(row)
        return [Event(row.uid, [token], None, done)]

    # ------------------------------------------------------------------ a round
    def _propose(self, rows: list[_Row], ns: list[int]) -> tuple[mx.array, list[Any]]:
        """Drafts [R, max(ns)] and each row's q; rows with n_r = 0 keep their context for later."""
        width = max(ns)
        fed = [i for i, n in enumerate(ns) if n > 0]
        tokens = mx.zeros((len(rows), width), mx.int32)
        qs: list[Any] = [None] * len(rows)
        if not fed:
            return tokens, qs
        sub = [rows[i] for i in fed]
        args = (
            [r.state for r in sub],
            [r.context for r in sub],
        )
        params = [r.request.params for r in sub]
        rngs = [r.rng for r in sub]
        sub_ns = [ns[i] for i in fed]
        if self._batched:
            anchors = mx.concatenate([r.next_tokens[-1:] for r in sub])
            drafts, sub_qs = drafting.propose_rows(
                self.drafter, *args, anchors, sub_ns, params, rngs
            )
        else:
            nexts = [r.next_tokens for r in sub]
            drafts, sub_qs, made = drafting.propose_each(
                self.drafter, *args, nexts, sub_ns, params, rngs
            )
            for j, i in enumerate(fed):
                ns[i] = made[j]
        for j, i in enumerate(fed):
            rows[i].context = rows[i].next_tokens = None  # read by the drafter
            qs[i] = sub_qs[j]
        if len(fed) == len(rows):
            return drafts, qs
        full = [mx.zeros((width,), mx.int32)] * len(rows)
        for j, i in enumerate(fed):
            full[i] = drafts[j]
        return mx.stack(full), qs

    def _round(self, rows: list[_Row]) -> list[Event]:
        cap = None if self.cap_for is None else self.cap_for(len(rows))
        ns = [r.draft_count(cap) for r in rows]
        anchors = [r.next_tokens[-1:] for r in rows]
        drafts, qs = self._propose(rows, ns)
        width = drafts.shape[1]
        ids = mx.concatenate([mx.stack([a[0] for a in anchors])[:, None], drafts], axis=1)
        logits, taps = forward_rows(self.target, ids, self.kv)
        accepted, bonus = self._verify(rows, ns, drafts, qs, logits)
        mx.eval(accepted, bonus, drafts)  # the round's one host sync
        accepted, bonus, proposed = accepted.tolist(), bonus.tolist(), drafts.tolist()
        return [
            self._commit(
                i,
                row,
                proposed[i][: ns[i]],
                accepted[i],
                bonus[i],
                width + 1,
                None if taps is None else taps[i],
            )
            for i, row in enumerate(rows)
        ]

    def _verify(
        self, rows: list[_Row], ns: list[int], drafts: mx.array, qs: list[Any], logits: mx.array
    ) -> tuple[mx.array, mx.array]:
        """Chain verification per row: greedy rows in one call, sampled rows on their streams."""
        width = drafts.shape[1]
        # `sampling.verify`'s greedy rule, with a row's drafts past its own n_r never accepted.
        top = mx.argmax(logits, axis=-1)
        greedy_acc = mx.zeros((len(rows),), mx.int32)
        if width:
            valid = mx.arange(width)[None] < mx.array(ns)[:, None]
            greedy_acc = mx.cumprod((drafts == top[:, :width]) & valid, axis=-1).sum(axis=-1)
        greedy_next = mx.take_along_axis(top, greedy_acc[:, None], axis=-1)[:, 0]
        acc, nxt = [], []
        for i, (row, n) in enumerate(zip(rows, ns)):
            p = row.request.params
            if p.greedy:
                acc.append(greedy_acc[i])
                nxt.append(greedy_next[i])
                continue
            with row.rng:
                a, t = verify(drafts[i, :n], qs[i], logits[i, : n + 1], p)
            acc.append(a.astype(greedy_acc.dtype))
            nxt.append(t.astype(greedy_next.dtype))
        return mx.stack(acc), mx.stack(nxt)

    def _commit(
        self,
        index: int,
        row: _Row,
        proposed: list[int],
        accepted: int,
        bonus: int,
        written: int,
        taps: mx.array | None,
    ) -> Event:
        """As `speculate`'s loop does after a round: the committed tokens (cut after a stop
        token), the cache rolled back to them (the forward wrote `written` positions), the
        drafter's next context."""
        committed = proposed[:accepted] + [bonus]
        finished = False
        for i, t in enumerate(committed):
            if t in row.request.eos_ids:
                committed, accepted, finished = committed[: i + 1], min(accepted, i + 1), True
                break
        for kv in self.kv:  # the batch's cache keeps [anchor, *committed[:-1]] of this row
            kv.trim(index, written - len(committed))
        row.produced += len(committed)
        finished = finished or row.produced >= row.request.max_new_tokens
        new = mx.array(committed, dtype=mx.int32)
        context = None if taps is None else taps[: accepted + 1]
        if row.context is not None and context is not None:  # the drafter skipped a round
            context = mx.concatenate([row.context, context])
        nexts = new if row.next_tokens is None else mx.concatenate([row.next_tokens, new])
        row.context, row.next_tokens = context, nexts
        return Event(row.uid, committed, Round(proposed, accepted, committed), finished)


def generate_batch(
    target: Target,
    drafter: Any,
    requests: Sequence[Request],
    *,
    joins: Sequence[int] | None = None,
    leaves: dict[int, int] | None = None,
    **kwargs: Any,
) -> list[list[int]]:
    """Run `requests` together to the end; each one's committed tokens (stop token included).
    `joins[i]`: the step at which request i is added (default: all at step 0); `leaves`:
    request -> step at which it is dropped (cancelled). Keywords as `BatchDecoder`."""
    decoder = BatchDecoder(target, drafter, **kwargs)
    joins = list(joins or [0] * len(requests))
    leaves = leaves or {}
    out: list[list[int]] = [[] for _ in requests]
    for step in itertools.count():
        for i, at in enumerate(joins):
            if at == step:
                decoder.add(requests[i], uid=i)
        for i, at in leaves.items():
            if at == step:
                decoder.drop(i)
        if not decoder.rows and step >= max(joins):
            return out
        for e in decoder.step():
            out[e.uid] += e.tokens


def decode_all(decoder: BatchDecoder) -> Iterable[Event]:
    """Step until every row is done."""
    while decoder.rows:
        yield from decoder.step()
