"""Lookup speculation: drafts copied from the text so far, with no drafter model.

The tokens at the end of the text (the prompt and everything committed) are looked up earlier in
the text; the tokens that followed the best earlier occurrence (the one whose match reaches
furthest back, the most recent among equals) are the drafts. Agents' outputs copy a lot from
their inputs (code edits, file rewrites, quoted tool results), so this pays for any model.

Drafts are deterministic, so `q` is a point mass on each: verify accepts draft x with
probability p(x) and, on a rejection, draws from p without x. Sampling stays exact.

`LookupDrafter(vocab_size)` drafts alone (`--mode lookup`). `LookupDrafter(vocab_size,
drafter)` wraps a trained drafter: a round whose match is at least `switch_at` tokens long uses
the lookup draft, any other round the trained one. The context of the rounds the trained drafter
skipped is fed to it on its next round (it only lags). The choice is made on the host, from
tokens the loop has already read, so it adds no host sync.

When a lookup round pays: it commits 1 + a(L) tokens for a verify of L + 1 (a(L): the drafts
accepted after a match of L tokens), a trained round 1 + a for its draft plus a verify of
n + 1. On the CPU backend a trained drafter's round costs about a target step or more, so any
match wins (measured: docs/bench.md); on a GPU the draft costs a fraction of a verify and lookup
only wins where a(L) nears the drafter's own acceptance, a long match (`default_switch`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache

from ..errors import SpecDecError
from ..sampling import SamplingParams
from .base import Drafter, Proposal


def default_switch() -> int:
    """The match length from which a round with a trained drafter uses the lookup draft: 2 (any
    match) on the CPU backend, where the drafter's round costs more than a target step; 8 on a
    GPU, where it is cheap beside the verify (a reasoned default: not measured on a GPU yet)."""
    return 2 if mx.default_device() == mx.cpu else 8


@dataclass(frozen=True)
class LookupConfig:
    """`ngram`: tokens that must match before anything is drafted. `max_draft`: most drafts a
    lookup round proposes; a round drafts half as many tokens as its match is long, rounded up
    (at most the cap): on the demo pair's edits, drafting a whole match of L tokens got about
    L/2 of them accepted, and every draft verified costs a row. `switch_at`: with a trained
    drafter, the match length from which a round uses the lookup draft (`default_switch`).
    `longest`: how far back a match is measured. `candidates`: how many recent occurrences of
    the n-gram are compared."""

    ngram: int = 2
    max_draft: int = 16
    switch_at: int = field(default_factory=default_switch)
    longest: int = 64
    candidates: int = 32

    def __post_init__(self) -> None:
        if not 1 <= self.ngram <= self.longest:
            raise SpecDecError(f"lookup ngram must be in 1..{self.longest}, got {self.ngram}")
        if self.max_draft < 1 or self.switch_at < self.ngram or self.candidates < 1:
            raise SpecDecError(
                "lookup max_draft and candidates must be >= 1 and switch_at >= ngram, got "
                f"{self.max_draft}, {self.candidates} and {self.switch_at}"
            )


class TokenIndex:
    """The text so far, on the host, with the positions where each `n`-gram ends."""

    def __init__(self, n: int, tokens: Sequence[int] = ()):
        self.n = n
        self.tokens: list[int] = []
        self.ends: dict[tuple[int, ...], list[int]] = {}
        self.extend(tokens)

    def extend(self, new: Sequence[int]) -> None:
        start, n = len(self.tokens), self.n
        self.tokens += new
        for end in range(max(start + 1, n), len(self.tokens) + 1):
            self.ends.setdefault(tuple(self.tokens[end - n : end]), []).append(end)

    def match(self, longest: int, candidates: int) -> tuple[int, int]:
        """(where the continuation starts, how many tokens match) for the best earlier
        occurrence of the text's last n tokens; (0, 0) when there is none."""
        t, size, n = self.tokens, len(self.tokens), self.n
        best = (0, 0)
        for end in reversed(self.ends.get(tuple(t[size - n :]), [])[-candidates - 1 :]):
            if end == size:  # the text's own end
                continue
            length = n
            while length < longest and end > length and t[end - length - 1] == t[-length - 1]:
                length += 1
            if length > best[1]:
                best = (end, length)
        return best

    def continuation(self, start: int, k: int) -> list[int]:
        """The `k` tokens from `start` on. Past the end of the text the copy reads its own
        output, so a repeating pattern keeps repeating."""
        out: list[int] = []
        for i in range(start, start + k):
            out.append(self.tokens[i] if i < len(self.tokens) else out[i - len(self.tokens)])
        return out


class LookupState(list):
    """A lookup drafter's per-sequence state, a list of caches like every drafter's: the wrapped
    drafter's caches, then one `KVCache` whose row p holds the token that followed position p
    (keys and values alike). So the loop's trims and the prefix cache's snapshots handle it as
    they do any context layer. On the host it keeps those tokens indexed (`index`, rebuilt
    from the rows whenever they changed behind its back: a prefix restore, a trim), and the
    context the wrapped drafter has not been fed yet (`pending`)."""

    def __init__(self, caches: list[Any]):
        super().__init__([*caches, KVCache()])
        self.index: TokenIndex | None = None
        self.pending: list[tuple[mx.array, mx.array]] = []

    @property
    def rows(self) -> KVCache:
        return self[-1]

    @property
    def inner(self) -> list[Any]:
        return list(self[:-1])

    def add(self, tokens: mx.array, n: int) -> TokenIndex:
        """Append the committed `tokens` (materialized: reading them waits for nothing)."""
        rows = self.rows
        if self.index is None or len(self.index.tokens) != rows.offset:
            held = rows.keys[0, 0, : rows.offset, 0].tolist() if rows.offset else []
            self.index = TokenIndex(n, held)
        new = tokens.astype(mx.int32)
        block = new.reshape(1, 1, -1, 1)
        rows.update_and_fetch(block, block)
        mx.async_eval(rows.keys, rows.values)  # tiny; keeps the rows from piling up lazily
        self.index.extend(new.tolist())
        return self.index


class LookupDrafter(nn.Module):
    """Drafts by lookup (alone, or for the rounds of a wrapped trained `drafter` whose match is
    long). Satisfies `base.Drafter`; with no drafter it has no taps, so the loop passes no
    context."""

    def __init__(
        self, vocab_size: int, drafter: Drafter | None = None, config: LookupConfig | None = None
    ):
        super().__init__()
        self.vocab_size = vocab_size  # for the point masses q
        self.lookup = config or LookupConfig()
        if drafter is not None:
            self.drafter = drafter  # a child module: its weights are ours for the fingerprint
        self.kind = "lookup" if drafter is None else f"{drafter.kind}+lookup"
        self.max_draft = max(self.lookup.max_draft, drafter.max_draft if drafter else 0)

    def __bool__(self) -> bool:
        return True  # a module is a dict: alone it holds nothing, yet it is a drafter

    @property
    def trained(self) -> Drafter | None:
        return getattr(self, "drafter", None)

    @property
    def tap_ids(self) -> tuple[int, ...]:
        return tuple(self.trained.tap_ids) if self.trained is not None else ()

    @property
    def config(self) -> Any:
        """What the prefix cache fingerprints: the lookup settings and the wrapped config."""
        return (self.lookup, getattr(self.trained, "config", None))

    def share_target_tensors(self, target: Any) -> list[str]:
        return self.trained.share_target_tensors(target) if self.trained is not None else []

    def new_state(self, padded: bool = False) -> LookupState:
        return LookupState(self.trained.new_state(padded) if self.trained is not None else [])

    def propose(
        self,
        state: LookupState,
        context: mx.array | None,
        next_tokens: mx.array,
        n: int,
        params: SamplingParams,
    ) -> Proposal:
        cfg = self.lookup
        index = state.add(next_tokens, cfg.ngram)
        start, length = index.match(cfg.longest, cfg.candidates)
        trained = self.trained
        if trained is None or length >= cfg.switch_at:
            if trained is not None:
                state.pending.append((context, next_tokens))
            k = min(n, cfg.max_draft, -(-length // 2))
            return self._point_masses(index.continuation(start, k), params)
        if state.pending:  # the context of the rounds it skipped, then this round's
            state.pending.append((context, next_tokens))
            context = mx.concatenate([c for c, _ in state.pending])
            next_tokens = mx.concatenate([t for _, t in state.pending])
            state.pending.clear()
        return trained.propose(state.inner, context, next_tokens, min(n, trained.max_draft), params)

    def _point_masses(self, tokens: list[int], params: SamplingParams) -> Proposal:
        drafts = mx.array(tokens, mx.int32)
        if params.greedy:
            return Proposal(drafts)
        q = (drafts[:, None] == mx.arange(self.vocab_size)[None]).astype(mx.float32)
        return Proposal(drafts, q)
