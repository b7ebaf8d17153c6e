"""What the verify loop, the loader and the prefix cache need from a drafter, whatever its
family. This protocol is the whole contract: nothing else is read from a drafter."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from ..sampling import SamplingParams


@dataclass
class Proposal:
    """One round's drafts, all lazy: `tokens` [n]; `q` [n, V] the distributions they were drawn
    from (None when greedy)."""

    tokens: mx.array
    q: mx.array | None = None


class Drafter(Protocol):
    """A drafter is an `mlx.nn.Module` (the loader loads, quantizes and evaluates its
    `parameters()`; the prefix cache fingerprints them) with these members."""

    # "dspark", "dflash" or "eagle3", from the checkpoint (not the class); "lookup" for the
    # drafter-free lookup, "<kind>+lookup" for a drafter with lookup rounds (`lookup.py`)
    kind: str
    tap_ids: tuple[int, ...]  # target layers whose outputs feed the drafter (may be none)
    max_draft: int  # most drafts one round can propose
    config: Any  # the parsed checkpoint config (part of the prefix-cache fingerprint)

    def parameters(self) -> dict[str, Any]:
        """The drafter's own weights (`nn.Module.parameters`)."""

    def share_target_tensors(self, target: Any) -> list[str]:
        """Use the target's embedding / LM head where the checkpoint's are the same tensors (or
        where the family always uses the target's); returns the names of those shared. Runs
        once, after loading and before quantization."""

    def new_state(self, padded: bool = False) -> list[KVCache]:
        """Fresh per-sequence state: KV caches whose rows are committed positions (one per
        context layer; lookup keeps the tokens themselves in one), so the loop can trim it and
        the prefix cache can snapshot and restore it. `padded` asks for `cache.PaddedKVCache`s
        (the target's `padded_attention`). The list may be a subclass carrying host-side data
        (lookup's token index): that data must be rebuilt from the rows whenever they changed
        under it (restored from a snapshot, trimmed)."""

    def propose(
        self,
        state: list[KVCache],
        context: mx.array,
        next_tokens: mx.array,
        n: int,
        params: SamplingParams,
    ) -> Proposal:
        """Draft up to `n` tokens after the anchor `next_tokens[-1]` (fewer only if the drafter
        cuts its own block short, e.g. DSpark's confidence threshold).

        `context` [k, m*H] are the target taps of the positions committed since the last call
        (the whole prompt on the first call; None for a drafter without taps) and `next_tokens`
        [k] the token that followed each of those positions, so the last one is the anchor,
        the newest committed token. On return, `state` holds the context rows only (no draft
        rows). Host-side work here (lookup's match) may read `next_tokens`, tokens the loop has
        already synced, and nothing still being computed: a round has one host sync, the loop's.
        """
