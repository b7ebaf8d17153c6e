"""The verify loop: one loop for every drafter.

Each round: the drafter proposes `n` tokens after the anchor (the newest committed token); the
target verifies `[anchor, *drafts]` in one forward that also yields the taps; chain verification
keeps the longest acceptable prefix plus one correction/bonus token; the target cache is trimmed
to what was committed; the taps of the committed rows feed the drafter next round. The round is
one lazy graph and one host sync; the next round is launched before the current one is handed
to the caller, so detokenizing and printing overlap with compute.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from .drafters.base import Drafter, Proposal
from .errors import SpecDecError
from .exact import decode_scores
from .sampling import (
    LogitsProcessor,
    Logprobs,
    SamplingParams,
    committed_rows,
    process_rows,
    row_logprobs,
    sample,
    verify,
)
from .target import Target


@dataclass
class Round:
    """What one round did: the drafts verified and how many of them the target accepted."""

    proposed: list[int]
    accepted: int
    committed: list[int] = field(default_factory=list)  # accepted drafts + correction/bonus


@dataclass
class Step:
    """Tokens committed by the prefill (round None) or by one round."""

    tokens: list[int]
    round: Round | None
    finished: bool = False
    # With `logprobs`: each token's log-probability under the target (after the logits
    # processors, as mlx-lm's generate_step reports it) and its top alternatives, best first.
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None


@dataclass
class _Launched:
    proposal: Proposal
    accepted: mx.array
    next_token: mx.array
    taps: mx.array
    reported: Logprobs | None = None


def _reported(logits: mx.array, tokens: mx.array, top: int | None) -> Logprobs | None:
    """The log-probabilities of the tokens the rows emit (None when not asked for), lazy."""
    return None if top is None else Logprobs.of(row_logprobs(logits), tokens, top)


def _read(reported: Logprobs | None, n: int) -> tuple[Any, Any]:
    return reported.read(n) if reported is not None else (None, None)


def check_max_draft(max_draft: int | None, drafter: Drafter) -> int:
    if max_draft is None:
        return drafter.max_draft
    if not 1 <= max_draft <= drafter.max_draft:
        raise SpecDecError(
            f"--max-draft must be between 1 and {drafter.max_draft} for this {drafter.kind} "
            f"drafter, got {max_draft}"
        )
    return max_draft


def speculate(
    target: Target,
    drafter: Drafter,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int,
    max_draft: int | None = None,
    params: SamplingParams | None = None,
    eos_ids: Collection[int] = (),
    cache: list[Any] | None = None,
    drafter_state: Any = None,
    cached: int = 0,
    logits_processors: Sequence[LogitsProcessor] = (),
    logprobs: int | None = None,
) -> Iterator[Step]:
    """Generate up to `max_new_tokens` tokens after `prompt_ids`, yielding each round's tokens.

    `cache` and `drafter_state` may already hold the first `cached` prompt positions (a reused
    prefix); only the rest of the prompt is prefilled. When the generator runs to its end,
    both hold the same committed positions (the last round's aside), ready to be kept.

    `logits_processors` (mlx-lm's: penalties, logit bias) reshape every verify row, each seeing
    the tokens plain decoding has seen there; drafts are proposals and ignore them. `logprobs`
    (None: off; k >= 0) puts on each step the log-probabilities of its tokens and the top k.
    """
    if not prompt_ids:
        raise SpecDecError("the prompt is empty: give at least one token")
    if not 0 <= cached < len(prompt_ids):
        raise SpecDecError(f"cached={cached} must leave at least one of the prompt's tokens")
    if max_new_tokens < 1:
        return
    cap = check_max_draft(max_draft, drafter)
    params = params or SamplingParams()
    if params.seed is not None:
        mx.random.seed(params.seed)
    cache = target.make_cache() if cache is None else cache
    state = drafter.new_state(target.padded_attention) if drafter_state is None else drafter_state
    prompt = mx.array(list(prompt_ids[cached:]), dtype=mx.int32)
    seen = list(prompt_ids)  # every committed token: the history the processors read
    # Exact mode picks from what mlx-lm's sampler reads: its log-probabilities, row by row.
    scores = decode_scores if getattr(target, "exact", None) else (lambda logits: logits)

    logits, taps = target.prefill(prompt, cache)
    logits = process_rows(logits[None], seen, logits_processors)[0]
    anchor = sample(scores(logits[None]), params).astype(mx.int32)
    first = anchor.item()
    first_scores = _read(_reported(logits[None], anchor, logprobs), 1)  # before launching
    seen.append(first)
    produced = 1
    if first in eos_ids or produced >= max_new_tokens:
        yield Step([first], None, True, *first_scores)
        return

    def launch(anchor: mx.array, context: mx.array, next_tokens: mx.array) -> _Launched:
        n = min(cap, max_new_tokens - produced - 1)
        if n > 0:
            proposal = drafter.propose(state, context, next_tokens, n, params)
        else:  # one token left: a plain target step
            proposal = Proposal(mx.zeros((0,), mx.int32))
        logits, taps = target(mx.concatenate([anchor, proposal.tokens]), cache)
        logits = process_rows(logits, seen, logits_processors, proposal.tokens)
        accepted, next_token = verify(proposal.tokens, proposal.q, scores(logits), params)
        emitted = committed_rows(proposal.tokens, accepted, next_token)
        reported = _reported(logits, emitted, logprobs)
        extra = reported.arrays() if reported is not None else ()
        mx.async_eval(accepted, next_token, proposal.tokens, *extra)
        return _Launched(proposal, accepted, next_token, taps, reported)

    # The drafter's first context is the prefilled prompt; the token after position p is p + 1.
    pending = launch(anchor, taps, mx.concatenate([prompt[1:], anchor]))
    yield Step([first], None, False, *first_scores)
    while pending is not None:
        run, pending = pending, None
        proposed = run.proposal.tokens.tolist()
        accepted, bonus = run.accepted.item(), run.next_token.item()
        committed = proposed[:accepted] + [bonus]
        finished = False
        for i, t in enumerate(committed):
            if t in eos_ids:  # an accepted stop token ends generation; no bonus after it
                committed, accepted, finished = committed[: i + 1], min(accepted, i + 1), True
                break
        # The cache keeps [anchor, *committed[:-1]]: the newest token is the next anchor. After
        # a stop token it ends right before it, so a run always ends holding all but its last
        # token (a recurrent state cannot be cut later, for a prefix snapshot).
        Target.rollback(cache, len(proposed) + 1 - len(committed))
        produced += len(committed)
        finished = finished or produced >= max_new_tokens
        seen += committed
        if not finished:
            next_tokens = mx.array(committed, dtype=mx.int32)
            context = None if run.taps is None else run.taps[: accepted + 1]  # no taps: lookup
            pending = launch(next_tokens[-1:], context, next_tokens)
        round_scores = _read(run.reported, len(committed))
        yield Step(committed, Round(proposed, accepted, committed), finished, *round_scores)
