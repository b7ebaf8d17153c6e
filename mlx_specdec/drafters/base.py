"""What the verify loop needs from a drafter, whatever its family."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import mlx.core as mx

from ..sampling import SamplingParams


@dataclass
class Proposal:
    """One round's drafts, all lazy: `tokens` [n]; `q` [n, V] the distributions they were drawn
    from (None when greedy); `confidence` [n] per-slot acceptance estimates, if the drafter has
    a confidence head and was asked for them."""

    tokens: mx.array
    q: mx.array | None = None
    confidence: mx.array | None = None


class Drafter(Protocol):
    kind: str  # "dspark", "dflash", "eagle3"
    tap_ids: tuple[int, ...]  # target layers whose outputs feed the drafter
    max_draft: int  # most drafts one round can propose

    def new_state(self) -> Any:
        """Fresh per-sequence state (the drafter's own context caches)."""

    def propose(
        self,
        state: Any,
        context: mx.array,
        next_tokens: mx.array,
        n: int,
        params: SamplingParams,
        with_confidence: bool = False,
    ) -> Proposal:
        """Draft `n` tokens after the anchor `next_tokens[-1]`.

        `context` [k, m*H] are the target taps of the positions committed since the last call
        (the whole prompt on the first call) and `next_tokens` [k] the token that followed each
        of those positions, so the last one is the anchor, the newest committed token.
        """
