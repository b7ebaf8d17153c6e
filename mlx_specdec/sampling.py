"""Sampling settings, the distributions they define, and lossless chain verification.

`p` (target) and `q` (draft) are both built by `probs`: mlx-lm's top-p, min-p and top-k filters on
the untempered log-softmax (the order and semantics of `mlx_lm.sample_utils.make_sampler`), then
the temperature. So a speculative sample follows exactly the distribution plain mlx-lm sampling
draws from. Logits processors (penalties, logit bias) and the reported log-probabilities are
mlx-lm's `generate_step`'s, applied to each verify row with the history plain decoding has at
that row (`process_rows`). Everything here is lazy: a round costs one host sync, in the loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral, Real

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_logits_processors

from .errors import SpecDecError

GREEDY_TEMPERATURE = 1e-5  # below this, draft and target are one-hot argmax (DeepSpec's rule)
# mlx-lm's: (every token before the row, logits [1, V]) -> logits [1, V]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise SpecDecError(f"temperature must be finite and >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise SpecDecError(f"top_p must be in (0, 1], got {self.top_p}")
        # mlx-lm's top-k filter takes only a Python int: a float (or numpy int) would crash deep
        # inside the first round, so reject the one and convert the other here.
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, Integral) or self.top_k < 0:
            raise SpecDecError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        object.__setattr__(self, "top_k", int(self.top_k))
        if not 0 <= self.min_p < 1:
            raise SpecDecError(f"min_p must be in [0, 1), got {self.min_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE


def probs(logits: mx.array, params: SamplingParams) -> mx.array:
    """Rows of logits -> the fp32 distribution a token is drawn from (not for greedy)."""
    lp = logits.astype(mx.float32)
    lp = lp - mx.logsumexp(lp, axis=-1, keepdims=True)
    if params.top_p < 1:
        lp = apply_top_p(lp, params.top_p)
    if params.min_p > 0:
        lp = apply_min_p(lp, params.min_p)
    if 0 < params.top_k < lp.shape[-1]:
        lp = apply_top_k(lp, params.top_k)
    return mx.softmax(lp / params.temperature, axis=-1)


def draw(p: mx.array) -> mx.array:
    """One token per row of a probability table."""
    return mx.random.categorical(mx.log(p))


def sample(logits: mx.array, params: SamplingParams) -> mx.array:
    """One token per row of logits: argmax when greedy, else a draw from `probs`."""
    if params.greedy:
        return mx.argmax(logits, axis=-1)
    return draw(probs(logits, params))


def verify(
    draft: mx.array, q: mx.array | None, logits: mx.array, params: SamplingParams
) -> tuple[mx.array, mx.array]:
    """Chain speculative sampling over one round, or a batch of independent rounds.

    `draft` [..., n] are the proposed tokens, `q` [..., n, V] the distributions they were drawn
    from (None when greedy or n = 0), `logits` [..., n+1, V] the target's outputs for
    `[anchor, *draft]`. Returns lazy `(accepted, next_token)`, each [...]: the length of the
    accepted prefix and the correction (on the first rejection, a draw from norm(max(p - q, 0)))
    or bonus (all accepted, a draw from p) token. The loop passes one round (no batch axes);
    the statistical tests pass many rows at once.
    """
    n = draft.shape[-1]
    if params.greedy:
        target_tokens = mx.argmax(logits, axis=-1)
        accepted = (
            mx.cumprod(draft == target_tokens[..., :n], axis=-1).sum(axis=-1)
            if n
            else mx.zeros(draft.shape[:-1], mx.int32)
        )
        return accepted, mx.take_along_axis(target_tokens, accepted[..., None], axis=-1)[..., 0]
    p = probs(logits, params)
    accepted = accept_length(draft, q, p)
    return accepted, draw(correction(p, q, accepted))


def accept_length(draft: mx.array, q: mx.array | None, p: mx.array) -> mx.array:
    """Accept draft k with probability min(1, p_k(x_k) / q_k(x_k)); the length of the run of
    acceptances from the first draft on. `p` [..., n+1, V] (only its first n rows are read)."""
    n = draft.shape[-1]
    if n == 0:
        return mx.zeros(draft.shape[:-1], mx.int32)
    assert q is not None, "a sampled draft needs the distribution it was drawn from"
    x = draft[..., None]
    p_x = mx.take_along_axis(p[..., :n, :], x, axis=-1)[..., 0]
    q_x = mx.maximum(mx.take_along_axis(q, x, axis=-1)[..., 0], 1e-8)
    ok = mx.random.uniform(shape=p_x.shape) < mx.minimum(p_x / q_x, 1.0)
    return mx.cumprod(ok, axis=-1).sum(axis=-1)


def correction(p: mx.array, q: mx.array | None, accepted: mx.array) -> mx.array:
    """The distribution of the token after the accepted run: norm(max(p_a - q_a, 0)) at the
    first rejection a, p_n itself when all n drafts were accepted (there is no q_n)."""
    rows = accepted[..., None, None]
    p_a = mx.take_along_axis(p, rows, axis=-2)[..., 0, :]
    n = 0 if q is None else q.shape[-2]
    if n == 0:
        return p_a
    rejected = (accepted < n)[..., None]
    q_a = mx.take_along_axis(q, mx.minimum(rows, n - 1), axis=-2)[..., 0, :]
    residual = mx.maximum(p_a - mx.where(rejected, q_a, 0.0), 0.0)
    mass = residual.sum(axis=-1, keepdims=True)
    # p <= q everywhere only happens through rounding (the rejection had probability ~0).
    return mx.where(mass > 1e-8, residual / mass, p_a)


# ----------------------------------------------------------------------------- processors
def penalty_processors(
    vocab_size: int,
    *,
    logit_bias: Mapping[int, float] | None = None,
    repetition_penalty: float | None = None,
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
    context_size: int = 20,
) -> list[LogitsProcessor]:
    """mlx-lm's `make_logits_processors` for these settings, checked first (a one-line error
    rather than a failure inside a round). Every penalty reads the last `context_size` tokens
    (prompt included), mlx-lm's default 20; 0 or None is off, and so is a repetition penalty of
    1 (it would change nothing)."""
    bias = dict(logit_bias or {})
    for token, value in bias.items():
        if isinstance(token, bool) or not isinstance(token, Integral):
            raise SpecDecError(f"logit_bias keys must be token ids, got {token!r}")
        if not 0 <= token < vocab_size:
            raise SpecDecError(
                f"logit_bias token {token} is outside the vocabulary 0..{vocab_size - 1}"
            )
        _check_finite("a logit_bias value", value)
    for name, value in (
        ("repetition_penalty", repetition_penalty),
        ("presence_penalty", presence_penalty),
        ("frequency_penalty", frequency_penalty),
    ):
        if value is not None:
            _check_finite(name, value)
    if repetition_penalty is not None and repetition_penalty < 0:
        raise SpecDecError(f"repetition_penalty must be >= 0, got {repetition_penalty}")
    if isinstance(context_size, bool) or not isinstance(context_size, Integral) or context_size < 1:
        raise SpecDecError(
            f"the penalties' context size must be an integer >= 1, got {context_size!r}"
        )
    return make_logits_processors(
        {int(t): float(v) for t, v in bias.items()} or None,
        None if repetition_penalty == 1 else repetition_penalty,
        int(context_size),
        presence_penalty,
        int(context_size),
        frequency_penalty,
        int(context_size),
    )


def _check_finite(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise SpecDecError(f"{name} must be a finite number, got {value!r}")


def process_rows(
    logits: mx.array,
    history: Sequence[int],
    processors: Sequence[LogitsProcessor],
    drafts: mx.array | None = None,
) -> mx.array:
    """Run logits processors over verify rows `logits` [R, V]: row j sees `history` (every
    token up to the anchor) and then `drafts[:j]`, the tokens plain decoding has seen when it
    computes that row (rows after a rejected draft are never read). One row at a time, as
    `generate_step` calls them."""
    if not processors:
        return logits
    before = mx.array(history, mx.int32)
    rows = []
    for j in range(logits.shape[0]):
        seen = before if j == 0 else mx.concatenate([before, drafts[:j].astype(mx.int32)])
        row = logits[j : j + 1]
        for processor in processors:
            row = processor(seen, row)
        rows.append(row)
    return mx.concatenate(rows, axis=0)


# ----------------------------------------------------------------------------- logprobs
def row_logprobs(logits: mx.array) -> mx.array:
    """Log-probabilities as mlx-lm's `generate_step` reports them: each row of (processed)
    logits minus its logsumexp, computed on the row alone, so the bits are plain decoding's."""
    rows = (logits[i : i + 1] for i in range(logits.shape[0]))
    return mx.concatenate([r - mx.logsumexp(r, keepdims=True) for r in rows], axis=0)


def committed_rows(draft: mx.array, accepted: mx.array, next_token: mx.array) -> mx.array:
    """The token each verify row commits: draft j before the accepted run ends, the correction
    or bonus at row `accepted` (rows after it commit nothing; their entries are junk)."""
    last = next_token.astype(mx.int32).reshape(1)
    rows = mx.arange(draft.shape[0] + 1)
    return mx.where(rows < accepted, mx.concatenate([draft.astype(mx.int32), last]), last)


@dataclass
class Logprobs:
    """Lazy per-row log-probabilities of committed tokens: `chosen` [R] and, with `top`, the
    best `top` (ids and values [R, top], best first)."""

    chosen: mx.array
    top_ids: mx.array | None = None
    top_values: mx.array | None = None

    @classmethod
    def of(cls, logprobs: mx.array, tokens: mx.array, top: int = 0) -> Logprobs:
        """From rows of log-probabilities (`row_logprobs`) and the token each row emitted."""
        chosen = mx.take_along_axis(logprobs, tokens.astype(mx.int32)[:, None], axis=-1)[:, 0]
        if top <= 0:
            return cls(chosen)
        top = min(top, logprobs.shape[-1])
        ids = mx.argpartition(-logprobs, kth=top - 1, axis=-1)[:, :top]
        values = mx.take_along_axis(logprobs, ids, axis=-1)
        order = mx.argsort(-values, axis=-1)
        ids, values = (mx.take_along_axis(a, order, axis=-1) for a in (ids, values))
        return cls(chosen, ids, values)

    def arrays(self) -> list[mx.array]:
        return [a for a in (self.chosen, self.top_ids, self.top_values) if a is not None]

    def read(self, n: int) -> tuple[list[float], list[list[tuple[int, float]]] | None]:
        """The first `n` rows on the host: ([logprob], [[(id, logprob)] best first] or None)."""
        chosen = self.chosen[:n].tolist()
        if self.top_ids is None:
            return chosen, None
        ids, values = self.top_ids[:n].tolist(), self.top_values[:n].tolist()
        return chosen, [list(zip(i, v, strict=True)) for i, v in zip(ids, values, strict=True)]
