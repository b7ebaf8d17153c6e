"""Sampling settings, the distributions they define, and lossless chain verification.

`p` (target) and `q` (draft) are both built by `probs`: mlx-lm's top-p, min-p and top-k filters on
the untempered log-softmax (the order and semantics of `mlx_lm.sample_utils.make_sampler`), then
the temperature. So a speculative sample follows exactly the distribution plain mlx-lm sampling
draws from. Everything here is lazy: a round costs one host sync, in the loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

from .errors import SpecDecError

GREEDY_TEMPERATURE = 1e-5  # below this, draft and target are one-hot argmax (DeepSpec's rule)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise SpecDecError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise SpecDecError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise SpecDecError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
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
    """Chain speculative sampling over one round.

    `draft` [n] are the proposed tokens, `q` [n, V] the distributions they were drawn from (None
    when greedy), `logits` [n+1, V] the target's outputs for `[anchor, *draft]`. Returns lazy
    `(accepted, next_token)`: the length of the accepted prefix and the correction (on the first
    rejection, a draw from norm(max(p - q, 0))) or bonus (all accepted, a draw from p) token.
    """
    n = draft.shape[0]
    if params.greedy:
        target_tokens = mx.argmax(logits, axis=-1)
        accepted = mx.cumprod(draft == target_tokens[:n]).sum() if n else mx.array(0)
        return accepted, target_tokens[accepted]
    p = probs(logits, params)
    if n:
        rows = mx.arange(n)
        p_x = p[rows, draft]
        q_x = mx.maximum(q[rows, draft], 1e-8)
        ok = mx.random.uniform(shape=(n,)) < mx.minimum(p_x / q_x, 1.0)
        accepted = mx.cumprod(ok).sum()
        q = mx.concatenate([q, mx.zeros((1, q.shape[-1]), q.dtype)])
    else:
        accepted, q = mx.array(0), mx.zeros_like(p)
    # Rejected at `accepted`: residual of that row; all accepted: q row is zero, so p itself.
    residual = mx.maximum(p[accepted] - q[accepted], 0.0)
    mass = residual.sum()
    residual = mx.where(mass > 1e-8, residual / mass, p[accepted])
    return accepted, draw(residual[None])[0]
