"""The parallel drafters (DSpark, DeepSpec DFlash, z-lab DFlash 1) over many sequences at once.

Rows share what is row-wise: the block's embeddings, projections, norms, MLP and head. Each
row's injected context (a different number of new positions per row) is projected into its own
KV caches, and each row's block attends over its own cache, one attention call per row, with the
shapes and mask of its solo `propose`. So where matmuls are row-invariant (MLX's CPU backend)
every row drafts bitwise what it drafts alone. Draws come from each row's own `RowRNG`, made
only for its own first `ns[r]` slots, so a sampled row draws what it draws alone.

Any other drafter (EAGLE3, DFlash 2, lookup, a DSpark confidence cut) runs `propose` row by row
(`propose_each`): the verify is still batched.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from ..rows import RowRNG
from ..sampling import SamplingParams
from .dflash import DFlashDrafter, block_mask
from .dspark import DSparkDrafter
from .layers import pick

Masks = dict[Any, list[Any]]  # a layer's mask key -> one mask per row (None: no mask)


def batched(drafter: Any) -> bool:
    """Does `drafter` draft many rows in one forward here (else: `propose_each`)?"""
    if type(drafter) is DSparkDrafter:
        return not drafter.confidence_threshold  # a cut needs a host sync per row
    return type(drafter) is DFlashDrafter


def _layers(
    layers: Sequence[Any],
    x: mx.array,
    contexts: Sequence[mx.array],
    states: Sequence[list[KVCache]],
    masks: Sequence[list[Any] | None],
) -> mx.array:
    """`InjectedDecoderLayer`s over rows: x [R, B, H] block rows, contexts[r] [1, c_r, H] the
    row's new normed context, states[r] its caches, masks[i] layer i's per-row masks."""
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        xn = layer.input_layernorm(x)
        held = []
        for ctx, state in zip(contexts, states):
            c = state[i]
            if ctx.shape[1]:  # the row's new context joins its cache (as InjectedAttention)
                held.append(c.update_and_fetch(*attn.keys_values(ctx, c.offset)))
            elif c.offset:
                held.append((c.keys[..., : c.offset, :], c.values[..., : c.offset, :]))
            else:
                held.append(None)
        starts = mx.array([s[i].offset for s in states], dtype=mx.int32)
        q = attn.queries(xn, starts)
        k, v = attn.keys_values(xn, starts)
        out = []
        for r, kv in enumerate(held):
            kr, vr = k[r : r + 1], v[r : r + 1]
            if kv is not None:
                kr, vr = mx.concatenate([kv[0], kr], axis=2), mx.concatenate([kv[1], vr], axis=2)
            out.append(attn.attend(q[r : r + 1], kr, vr, None if masks[i] is None else masks[i][r]))
        x = layer.after_attention(x, mx.concatenate(out, axis=0))
    return x


def ingest(drafter: Any, state: list[KVCache], taps: mx.array) -> None:
    """Project a prompt chunk's taps [c, m*H] into a parallel drafter's context caches, as its
    first `propose` would: a joining prompt's drafter context is built chunk by chunk with its
    prefill, not in the round after it (the context projection is row-wise, so it is the same)."""
    c = drafter.hidden_norm(drafter.fc(taps))[None]
    for layer, cache in zip(drafter.layers, state):
        cache.update_and_fetch(*layer.self_attn.keys_values(c, cache.offset))


def _contexts(drafter: Any, contexts: Sequence[mx.array]) -> list[mx.array]:
    """Each row's new taps [c_r, m*H] -> normed context [1, c_r, H], in one projection."""
    sizes = [c.shape[0] for c in contexts]
    flat = drafter.hidden_norm(drafter.fc(mx.concatenate(list(contexts), axis=0)))
    bounds = [sum(sizes[:r]) for r in range(len(sizes) + 1)]
    return [flat[None, bounds[r] : bounds[r + 1]] for r in range(len(sizes))]


def _blocks(anchors: mx.array, block_size: int, mask_token_id: int) -> mx.array:
    """anchors [R] -> [R, block] of anchor then mask tokens (`layers.anchor_block`, per row)."""
    masks = mx.full((anchors.shape[0], block_size - 1), mask_token_id, mx.int32)
    return mx.concatenate([anchors[:, None].astype(mx.int32), masks], axis=1)


def _dspark_hidden(d: DSparkDrafter, block: mx.array, ctx: list[mx.array], states: Any) -> Any:
    x = d._embed(block)
    masks = [None] * len(d.layers)
    return d.norm(_layers(d.layers, x, ctx, states, masks))


def _dflash_hidden(d: DFlashDrafter, block: mx.array, ctx: list[mx.array], states: Any) -> Any:
    cfg, target = d.config, d._bound()
    x = target.embed_tokens(block)
    scale = target.embed_scale * cfg.input_embedding_scale
    if scale != 1.0:
        x = x * scale
    starts = [s[0].offset + c.shape[1] for s, c in zip(states, ctx)]
    keys = list(zip(cfg.windows, cfg.causal))
    per_key = {
        key: [block_mask(start, block.shape[1], *key) for start in starts] for key in set(keys)
    }
    masks = [None if all(m is None for m in per_key[k]) else per_key[k] for k in keys]
    return d.norm(_layers(d.layers, x, ctx, states, masks))


def _pick_rows(
    logits: mx.array, ns: Sequence[int], params: Sequence[SamplingParams], rngs: Sequence[RowRNG]
) -> tuple[mx.array, list[mx.array | None]]:
    """logits [R, n, V] -> tokens [R, n] and each row's q over its first ns[r] slots: greedy rows
    at once, sampled rows each with its own stream."""
    tokens = mx.argmax(logits, axis=-1).astype(mx.int32)
    qs: list[mx.array | None] = [None] * len(ns)
    rows = []
    for r, (n, p, rng) in enumerate(zip(ns, params, rngs)):
        if p.greedy or n == 0:
            rows.append(tokens[r])
            continue
        with rng:
            drawn, qs[r] = pick(logits[r, :n], p)
        rows.append(mx.concatenate([drawn, tokens[r, n:]]))
    return mx.stack(rows), qs


def propose_rows(
    drafter: Any,
    states: Sequence[list[KVCache]],
    contexts: Sequence[mx.array],
    anchors: mx.array,
    ns: Sequence[int],
    params: Sequence[SamplingParams],
    rngs: Sequence[RowRNG],
) -> tuple[mx.array, list[mx.array | None]]:
    """Draft for every row at once (`batched(drafter)`): anchors [R] the rows' newest tokens,
    contexts[r] [c_r, m*H] their new taps. Returns tokens [R, max(ns)] (row r's first ns[r]
    count) and each sampled row's q [ns[r], V]."""
    n = max(ns)
    cfg = drafter.config
    block = _blocks(anchors, cfg.block_size, cfg.mask_token_id)
    ctx = _contexts(drafter, contexts)
    if isinstance(drafter, DFlashDrafter):
        return _pick_rows(
            drafter.head(_dflash_hidden(drafter, block, ctx, states)[:, 1 : 1 + n]),
            ns,
            params,
            rngs,
        )
    start = cfg.logits_start
    logits = drafter._head(_dspark_hidden(drafter, block, ctx, states)[:, start : start + n])
    if not cfg.markov_rank:
        return _pick_rows(drafter._to_target(logits), ns, params, rngs)
    # Markov: slot k's bias depends on the token drawn at slot k-1 (the anchor for k = 0).
    w1, w2 = drafter.markov_head.markov_w1, drafter.markov_head.markov_w2
    prev = block[:, 0]
    slots, qs = [], [[] for _ in ns]
    for k in range(n):
        step = drafter._to_target(logits[:, k] + w2(w1(prev)))
        greedy = mx.argmax(step, axis=-1).astype(mx.int32)
        picked = []
        for r, (nr, p, rng) in enumerate(zip(ns, params, rngs)):
            if p.greedy or k >= nr:
                picked.append(greedy[r : r + 1])
                continue
            with rng:
                token, q = pick(step[r : r + 1], p)
            picked.append(token)
            qs[r].append(q)
        prev = mx.concatenate(picked)
        slots.append(prev)
    tokens = mx.stack(slots, axis=1) if slots else mx.zeros((len(ns), 0), mx.int32)
    return tokens, [mx.concatenate(q) if q else None for q in qs]


def propose_each(
    drafter: Any,
    states: Sequence[list[KVCache]],
    contexts: Sequence[mx.array | None],
    next_tokens: Sequence[mx.array],
    ns: Sequence[int],
    params: Sequence[SamplingParams],
    rngs: Sequence[RowRNG],
) -> tuple[mx.array, list[mx.array | None], list[int]]:
    """Any drafter, its own `propose` row by row (each with its own stream): tokens [R, max(ns)]
    (zeros past a row's drafts), each row's q, and how many drafts each row made (a drafter
    may cut its block short, e.g. DSpark's confidence cut)."""
    n = max(ns)
    rows, qs, made = [], [], []
    for r in range(len(ns)):
        with rngs[r]:
            p = drafter.propose(states[r], contexts[r], next_tokens[r], ns[r], params[r])
        made.append(p.tokens.shape[0])
        rows.append(mx.concatenate([p.tokens, mx.zeros((n - made[-1],), mx.int32)]))
        qs.append(p.q)
    return mx.stack(rows), qs, made
