"""EAGLE3 (DeepSpec `Qwen3Eagle3Model` / `Gemma4Eagle3Model`): one decoder layer that drafts
autoregressively. The Gemma4 variant takes DSpark's Gemma-4 deltas: global head dim, K=V with
v_norm, attention scale 1, sandwich norms and gelu-tanh MLP, scaled embeddings, soft-capped
logits.

Each row pairs a hidden state with a token: the fused target taps of position i (or, inside a
chain, the drafter's own previous output) with the token at i + 1, at RoPE position i. The layer
keeps its own KV cache of committed rows. Each round it appends the newly committed (taps, next
token) rows, drafts from the last row's output, then feeds each draft back with its own output
hidden state, one 1-row forward per further draft; the chain's rows are dropped again at the end.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache

from ..errors import SpecDecError
from ..sampling import SamplingParams
from .base import Proposal
from .layers import (
    BACKBONE_KEYS,
    AttentionShape,
    InjectedAttention,
    InjectedDecoderLayer,
    TargetCopies,
    attention_shape,
    check_gemma4_drafter,
    gemma4_attention_shape,
    gemma_embed_scale,
    pick,
    require_keys,
    rope_scaling,
)

ARCHITECTURES = ("Qwen3Eagle3Model", "Gemma4Eagle3Model")
MODE = "eagle3"


@dataclass(frozen=True)
class Eagle3Config:
    shape: AttentionShape
    intermediate_size: int
    vocab_size: int
    target_layer_ids: tuple[int, ...]
    ttt_length: int
    gemma: bool = False  # Gemma-4 layer, scaled embeddings, soft-capped logits
    logit_softcap: float | None = None
    # Other formats (defaults are DeepSpec's): a reduced draft vocabulary, the target's
    # embedding when the checkpoint has none, the residual taken after hidden_norm
    # (speculators `norm_before_residual`), the normed output fed to the next chain step
    # (speculators `norm_output`, EAGLE 3.1).
    draft_vocab_size: int | None = None
    shared_embedding: bool = False
    norm_before_residual: bool = False
    norm_output: bool = False

    @classmethod
    def from_dict(cls, c: dict, where: str = "config.json") -> Eagle3Config:
        require_keys(c, BACKBONE_KEYS + ("target_layer_ids",), "EAGLE3", where)
        # Re-extending the cache with several committed rows at once, unmasked, is exact only
        # for one layer (each row's K/V then depends on that row alone).
        if int(c["num_hidden_layers"]) != 1:
            raise SpecDecError(
                f"{where}: EAGLE3 drafters with {c['num_hidden_layers']} layers are not supported "
                "(only the 1-layer checkpoints DeepSpec releases)"
            )
        ttt = int(c.get("ttt_length", 7))
        if ttt < 1:
            raise SpecDecError(f"{where}: ttt_length must be >= 1, got {ttt}")
        gemma = (c.get("architectures") or ["?"])[0] == "Gemma4Eagle3Model"
        if gemma:
            check_gemma4_drafter(c, where)
        cap = c.get("final_logit_softcapping") if gemma else None
        act = c.get("hidden_act", "silu")
        if not gemma and act != "silu":
            raise SpecDecError(f"{where}: EAGLE3 hidden_act '{act}' is not supported (only silu)")
        shape = gemma4_attention_shape(c) if gemma else attention_shape(c)
        if not gemma:
            shape = replace(
                shape,
                qk_norm=bool(c.get("qk_norm", True)),
                rope_scaling=rope_scaling(c, where),
                max_position_embeddings=c.get("max_position_embeddings"),
            )
        draft_vocab = c.get("draft_vocab_size")
        return cls(
            shape=shape,
            intermediate_size=int(c["intermediate_size"]),
            vocab_size=int(c["vocab_size"]),
            target_layer_ids=tuple(int(i) for i in c["target_layer_ids"]),
            ttt_length=ttt,
            gemma=gemma,
            logit_softcap=float(cap) if cap else None,
            draft_vocab_size=int(draft_vocab) if draft_vocab else None,
            shared_embedding=bool(c.get("shared_embedding", False)),
            norm_before_residual=bool(c.get("norm_before_residual", False)),
            norm_output=bool(c.get("norm_output", False)),
        )


class Eagle3Attention(InjectedAttention):
    """Attention over the drafter's own cache; q/k/v read [embedding ; hidden] (2H). Qwen3's, or
    with the Gemma-4 options of `AttentionShape` (K=V, v_norm, scale 1, proportional RoPE)."""

    def __init__(self, s: AttentionShape):
        super().__init__(replace(s, hidden_size=2 * s.hidden_size))
        self.o_proj = nn.Linear(s.num_heads * s.head_dim, s.hidden_size, bias=s.attention_bias)

    def __call__(self, x: mx.array, cache: KVCache) -> mx.array:
        """x [1, T, 2H]: every row's K/V joins the cache, only the last row queries. It sees all
        cached rows, so the reference's causal (prefill) and unmasked (re-extend) forwards agree
        on it, and the other rows' outputs are never used."""
        k, v = cache.update_and_fetch(*self.keys_values(x, cache.offset))
        return self.attend(self.queries(x[:, -1:], cache.offset - 1), k, v)


class Eagle3Layer(InjectedDecoderLayer):
    """The decoder layer of `InjectedDecoderLayer` (pre-norm Qwen3, or Gemma-4 sandwich norms,
    gelu-tanh MLP and `layer_scalar`) with EAGLE3's input: [input_layernorm(embeds) ;
    hidden_norm(hidden)] feeds the attention, the hidden stream is the residual."""

    def __init__(
        self,
        s: AttentionShape,
        intermediate_size: int,
        gemma: bool = False,
        norm_before_residual: bool = False,
    ):
        super().__init__(s, intermediate_size, gemma=gemma)
        self.hidden_norm = nn.RMSNorm(s.hidden_size, eps=s.rms_norm_eps)
        self.self_attn = Eagle3Attention(s)
        self.norm_before_residual = norm_before_residual

    def __call__(self, embeds: mx.array, hidden: mx.array, cache: KVCache) -> mx.array:
        """embeds, hidden [1, T, H] -> the last row's output hidden state [1, 1, H] (pre-norm;
        it is also the next chain step's hidden input)."""
        normed = self.hidden_norm(hidden)
        x = mx.concatenate([self.input_layernorm(embeds), normed], axis=-1)
        residual = normed if self.norm_before_residual else hidden
        return self.after_attention(residual[:, -1:], self.self_attn(x, cache))


class Eagle3Drafter(TargetCopies, nn.Module):
    def __init__(self, config: Eagle3Config):
        super().__init__()
        s = config.shape
        self.config = config
        self.kind = MODE
        self.tap_ids = config.target_layer_ids
        self.max_draft = config.ttt_length
        if not config.shared_embedding:
            self.embed_tokens = nn.Embedding(config.vocab_size, s.hidden_size)
        self.fc = nn.Linear(len(config.target_layer_ids) * s.hidden_size, s.hidden_size, bias=False)
        layer = Eagle3Layer(s, config.intermediate_size, config.gemma, config.norm_before_residual)
        self.layers = [layer]
        self.norm = nn.RMSNorm(s.hidden_size, eps=s.rms_norm_eps)
        rows = config.draft_vocab_size or config.vocab_size
        self.lm_head = nn.Linear(s.hidden_size, rows, bias=False)
        object.__setattr__(self, "_shared", {})
        if config.gemma:
            self._embed_scale = gemma_embed_scale(s.hidden_size)
            self._logit_softcap = config.logit_softcap

    def new_state(self, padded: bool = False) -> list[KVCache]:
        # Never padded: after the 1-row chain steps, shapes repeat without it.
        return [KVCache()]

    def extend(self, cache: KVCache, context: mx.array, next_tokens: mx.array) -> mx.array:
        """Append the committed (taps, next token) rows; returns the last row's output hidden
        state [1, 1, H]."""
        return self.layers[0](self._embed(next_tokens)[None], self.fc(context)[None], cache)

    def step(self, cache: KVCache, token: mx.array, h: mx.array) -> mx.array:
        """One chain step: the token just drafted [1] with the output hidden state it came from."""
        return self.layers[0](self._embed(token)[None], h, cache)

    def logits(self, h: mx.array) -> mx.array:
        """Logits on the target's ids of an output hidden state (already normed with
        `norm_output`)."""
        return self._to_target(self._head(h[0] if self.config.norm_output else self.norm(h[0])))

    def out(self, h: mx.array) -> mx.array:
        """A layer output as the chain carries it: normed with `norm_output` (EAGLE 3.1)."""
        return self.norm(h) if self.config.norm_output else h

    def propose(
        self,
        state: list[KVCache],
        context: mx.array,
        next_tokens: mx.array,
        n: int,
        params: SamplingParams,
    ) -> Proposal:
        cache = state[0]
        h = self.out(self.extend(cache, context, next_tokens.astype(mx.int32)))
        committed = cache.offset
        tokens, qs = [], []
        for k in range(n):
            if k:
                h = self.out(self.step(cache, tokens[-1], h))
            token, q = pick(self.logits(h), params)
            tokens.append(token)
            qs.append(q)
        # Drop the chain rows: between rounds the cache holds committed positions only, like
        # every drafter's state, so it can be trimmed or snapshotted as a plain prefix.
        cache.trim(cache.offset - committed)
        return Proposal(mx.concatenate(tokens), None if params.greedy else mx.concatenate(qs))


def accepts_mode(config: dict, mode: str) -> bool:
    return mode == MODE


def build(config: dict, what: str) -> Eagle3Drafter:
    return Eagle3Drafter(Eagle3Config.from_dict(config, what))
