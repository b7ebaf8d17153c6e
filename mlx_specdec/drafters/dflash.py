"""z-lab DFlash (v1, `DFlashDraftModel`): a block-diffusion drafter that embeds its block with the
target's embedding and decodes it with the target's LM head. z-lab's `DFlashDraftModel` is the
reference; tests/fixtures/conformance holds its outputs.

One forward drafts a whole block: [anchor, mask x (B-1)] attends to the injected target context
and (bidirectionally, in full-attention layers) to itself; block row k predicts the token at
anchor + k (not shifted, unlike DSpark), so rows 1..B-1 are the B-1 drafts.

Cap semantics: a round always drafts the full trained block and the loop verifies
only the first `n` drafts. Shrinking the block instead would change every slot's output, since the
block attends to all its mask rows, so slot k would no longer be what the drafter was trained to
predict; with the full block, acceptance at slot k is the same whatever the cap, and the few extra
block rows cost little next to the target's verify forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache
from mlx_lm.models.rope_utils import initialize_rope

from ..cache import kv_cache
from ..errors import SpecDecError
from ..sampling import SamplingParams
from ..target import Target
from .base import Proposal
from .layers import (
    BACKBONE_KEYS,
    AttentionShape,
    InjectedDecoderLayer,
    anchor_block,
    attention_shape,
    pick,
    require_keys,
    rope_parameters,
)

ARCHITECTURES = ("DFlashDraftModel",)
MODE = "dflash"
_LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass(frozen=True)
class DFlashConfig:
    shape: AttentionShape
    intermediate_size: int
    num_layers: int
    block_size: int
    mask_token_id: int
    target_layer_ids: tuple[int, ...]
    windows: tuple[int | None, ...]  # per draft layer: sliding window, None = full attention
    causal: tuple[bool, ...]  # per draft layer: causal inside the block
    rope_scaling: dict | None
    max_position_embeddings: int | None
    input_embedding_scale: float
    output_multiplier: float
    logit_softcap: float | None

    @classmethod
    def from_dict(cls, c: dict, where: str = "config.json") -> DFlashConfig:
        # z-lab nests the DFlash keys in `dflash_config`; some third-party copies put them at the
        # top level, and newer wheels also allow block_size/softcap in either place.
        dc = c.get("dflash_config") or {}

        def key(name: str, default: Any = None) -> Any:
            return dc.get(name, c.get(name, default))

        keys = BACKBONE_KEYS + ("mask_token_id", "target_layer_ids")
        require_keys({**c, **dc}, keys, "DFlash", where)
        num_layers = int(c["num_hidden_layers"])
        block_size = int(key("block_size", 16))
        if block_size < 2:
            raise SpecDecError(f"{where}: DFlash block_size must be >= 2, got {block_size}")
        layer_types = c.get("layer_types") or ["full_attention"] * num_layers
        if len(layer_types) != num_layers or any(t not in _LAYER_TYPES for t in layer_types):
            raise SpecDecError(
                f"{where}: layer_types must list {num_layers} entries, each one of "
                f"{' / '.join(_LAYER_TYPES)}; got {layer_types}"
            )
        window = c.get("sliding_window")
        if "sliding_attention" in layer_types and not (isinstance(window, int) and window > 0):
            raise SpecDecError(f"{where}: sliding_attention layers need a positive sliding_window")
        # Default (z-lab wheel): sliding layers are causal inside the block, full layers are not;
        # a top-level `is_causal` overrides both.
        is_causal = c.get("is_causal")
        sliding = [t == "sliding_attention" for t in layer_types]
        scaling = rope_parameters(c)
        if scaling.get("rope_type", scaling.get("type", "default")) == "default":
            scaling = None
        cap = key("final_logit_softcapping")
        return cls(
            shape=attention_shape(c),
            intermediate_size=int(c["intermediate_size"]),
            num_layers=num_layers,
            block_size=block_size,
            mask_token_id=int(key("mask_token_id")),
            target_layer_ids=tuple(int(i) for i in key("target_layer_ids")),
            windows=tuple(int(window) if s else None for s in sliding),
            causal=tuple(bool(is_causal) if is_causal is not None else s for s in sliding),
            rope_scaling=scaling,
            max_position_embeddings=c.get("max_position_embeddings"),
            input_embedding_scale=float(dc.get("input_embedding_scale", 1.0)),
            output_multiplier=float(dc.get("output_multiplier", 1.0)),
            logit_softcap=float(cap) if cap and float(cap) > 0 else None,
        )


def block_mask(start: int, size: int, window: int | None, causal: bool) -> mx.array | None:
    """Which keys (context rows 0..start-1, then the block) each block query may see; None = all.

    Queries sit at positions start..start+size-1. A sliding window keeps keys less than `window`
    positions away; `causal` hides later block rows.
    """
    if window is None and not causal:
        return None
    q = mx.arange(start, start + size)[:, None]
    k = mx.arange(start + size)[None]
    keep = k <= q if causal else mx.ones((size, start + size), mx.bool_)
    if window is not None:
        keep = keep & (mx.abs(q - k) < window)
    return keep


class DFlashDrafter(nn.Module):
    def __init__(self, config: DFlashConfig):
        super().__init__()
        s = config.shape
        self.config = config
        self.kind = MODE
        self.tap_ids = config.target_layer_ids
        self.max_draft = config.block_size - 1
        self.fc = nn.Linear(len(config.target_layer_ids) * s.hidden_size, s.hidden_size, bias=False)
        self.hidden_norm = nn.RMSNorm(s.hidden_size, eps=s.rms_norm_eps)
        self.layers = [
            self.make_layer(s, config.intermediate_size) for _ in range(config.num_layers)
        ]
        if config.rope_scaling:  # yarn & co. (the drafter's own rope, never the target's)
            for layer in self.layers:
                layer.self_attn.rope = initialize_rope(
                    s.head_dim,
                    s.rope_theta,
                    False,
                    config.rope_scaling,
                    config.max_position_embeddings,
                )
        self.norm = nn.RMSNorm(s.hidden_size, eps=s.rms_norm_eps)
        # The target, bound by `share_target_tensors`; a plain attribute so its weights are never
        # part of (or quantized with) ours.
        object.__setattr__(self, "_target", None)

    def make_layer(self, s: AttentionShape, intermediate_size: int) -> nn.Module:
        return InjectedDecoderLayer(s, intermediate_size)

    def share_target_tensors(self, target: Target) -> list[str]:
        """DFlash has no embedding or LM head of its own: it always uses the target's."""
        if not 0 <= self.config.mask_token_id < target.vocab_size:
            raise SpecDecError(
                f"DFlash mask_token_id {self.config.mask_token_id} is outside {target.name}'s "
                f"{target.vocab_size} embedding rows: the drafter was made for another target"
            )
        object.__setattr__(self, "_target", target)
        return ["embed_tokens", "lm_head"]

    def new_state(self, padded: bool = False) -> list[KVCache]:
        return [kv_cache(padded) for _ in self.layers]

    def _bound(self) -> Target:
        if self._target is None:
            raise SpecDecError(
                "this DFlash drafter is not bound to a target; load it with load_pair"
            )
        return self._target

    def hidden(
        self, block: mx.array, context: mx.array, caches: list[KVCache], rows: int
    ) -> mx.array:
        """Block ids [B] + new context taps [S, m*H] -> normed hidden states of block rows
        1..rows [rows, H]."""
        cfg, target = self.config, self._bound()
        x = target.embed_tokens(block)[None]
        scale = target.embed_scale * cfg.input_embedding_scale  # mlx-lm applies Gemma's outside
        if scale != 1.0:
            x = x * scale
        c = self.hidden_norm(self.fc(context))[None]
        start = caches[0].offset + context.shape[0]  # the anchor's absolute position
        masks = {
            key: block_mask(start, block.shape[0], *key)
            for key in set(zip(cfg.windows, cfg.causal))
        }
        for layer, cache, key in zip(self.layers, caches, zip(cfg.windows, cfg.causal)):
            x = layer(x, c, cache, masks[key])
        return self.norm(x)[0, 1 : 1 + rows]

    def head(self, h: mx.array) -> mx.array:
        """Hidden states -> logits: the target's head, then the drafter's own multiplier and
        soft-cap (never the target's soft-cap)."""
        cfg = self.config
        out = self._bound().project(h)
        if cfg.output_multiplier != 1.0:
            out = out * cfg.output_multiplier
        if cfg.logit_softcap:
            out = mx.tanh(out / cfg.logit_softcap) * cfg.logit_softcap
        return out

    def logits(
        self, block: mx.array, context: mx.array, caches: list[KVCache], rows: int
    ) -> mx.array:
        """Block ids [B] + new context taps [S, m*H] -> logits of block rows 1..rows [rows, V]."""
        return self.head(self.hidden(block, context, caches, rows))

    def propose(
        self,
        state: list[KVCache],
        context: mx.array,
        next_tokens: mx.array,
        n: int,
        params: SamplingParams,
    ) -> Proposal:
        cfg = self.config
        block = anchor_block(next_tokens, cfg.block_size, cfg.mask_token_id)
        tokens, q = pick(self.logits(block, context, state, n), params)
        return Proposal(tokens, q)


def accepts_mode(config: dict, mode: str) -> bool:
    return mode == MODE


def build(config: dict, what: str) -> DFlashDrafter:
    return DFlashDrafter(DFlashConfig.from_dict(config, what))
