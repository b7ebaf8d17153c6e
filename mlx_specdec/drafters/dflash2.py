"""z-lab DFlash 2 (`DFlash2DraftModel`): DFlash with two changes to the math, so a family of its
own on top of `dflash.DFlashDrafter`. The z-lab wheel's `dflash/model.py` (and its MLX twin, and
vLLM speculators' `dflash2`, which matches them) is the reference; tests/fixtures/formats holds
its outputs.

1. **Grouped dynamic causal convolutions** around each draft layer's attention and MLP. For a
   sublayer input x (block rows t = 0..B-1, the anchor's row first), one projection gives
   per-group coefficients d = W x_t, shaped [2, K, H/G]: the first half convolves the input,
   the second the sublayer's output. conv(x)_t = sum_{o<K} (base[o] + d_t[o]) * x_{t-o}, with
   base [K, H] per channel, d_t[o] one scalar per group of G channels, and zero rows before the
   block. Only block rows are convolved; the injected context is not.
2. **A candidate selector** instead of a per-row argmax: the top-K target-head logits of each row
   are rescored with a bilinear predecessor term, unary[c] + <P[prev] * (A h_t), S[c]>, and a
   chain walks the rows: the anchor is the first predecessor, each pick the next one. Sampling
   draws from softmax(scores / T) over the K candidates (the reference applies no top-p/top-k
   there), and q, scattered onto the target vocabulary, is what the draft was drawn from.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache

from ..errors import SpecDecError
from ..sampling import SamplingParams, draw
from .base import Proposal
from .dflash import DFlashConfig, DFlashDrafter
from .layers import AttentionShape, InjectedDecoderLayer, anchor_block

ARCHITECTURES = ("DFlash2DraftModel",)
MODE = "dflash"
_KEYS = ("conv_kernel_size", "conv_group_size", "selector_rank", "selector_top_k")


@dataclass(frozen=True)
class DFlash2Config(DFlashConfig):
    conv_kernel_size: int
    conv_group_size: int
    selector_rank: int
    selector_top_k: int
    vocab_size: int

    @classmethod
    def from_dict(cls, c: dict, where: str = "config.json") -> DFlash2Config:
        base = DFlashConfig.from_dict(c, where)
        dc = c.get("dflash_config") or {}
        values = {k: dc.get(k, c.get(k)) for k in _KEYS}
        missing = [k for k, v in values.items() if v is None]
        if missing:
            raise SpecDecError(
                f"{where}: DFlash-2 checkpoints without {', '.join(missing)} (dflash_config) are "
                "not supported: the candidate selector and convolutions need them"
            )
        values = {k: int(v) for k, v in values.items()}
        if any(v < 1 for v in values.values()):
            raise SpecDecError(f"{where}: DFlash-2 {values} must all be >= 1")
        hidden = base.shape.hidden_size
        if hidden % values["conv_group_size"]:
            raise SpecDecError(
                f"{where}: conv_group_size {values['conv_group_size']} does not divide "
                f"hidden_size {hidden}"
            )
        kept = {f.name: getattr(base, f.name) for f in fields(DFlashConfig)}
        return cls(**kept, **values, vocab_size=int(c["vocab_size"]))


def grouped_conv(x: mx.array, delta: mx.array, base: mx.array, group: int) -> mx.array:
    """x [1, L, H], delta [1, L, K, H/G], base [K, H] -> sum_o (base[o] + delta[o]) * x_{t-o}
    (rows before the block are zero)."""
    _, length, hidden = x.shape
    groups = hidden // group
    blocks = x.reshape(1, length, groups, group)
    out = mx.zeros_like(blocks)
    for o in range(base.shape[0]):
        shifted = blocks
        if o:
            shifted = mx.concatenate([mx.zeros_like(blocks[:, :o]), blocks[:, :-o]], axis=1)
        kernel = base[o].reshape(1, 1, groups, group).astype(x.dtype) + delta[:, :, o, :, None]
        out = out + kernel * shifted
    return out.reshape(x.shape)


class GroupedDynamicConv(nn.Module):
    def __init__(self, hidden_size: int, kernel_size: int, group_size: int):
        super().__init__()
        self.group_size, self.kernel_size = group_size, kernel_size
        groups = hidden_size // group_size
        self.base_kernel = mx.zeros((2, kernel_size, hidden_size))
        self.kernel_projection = nn.Linear(hidden_size, 2 * kernel_size * groups, bias=False)

    def prepare(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """The convolved input, and the output side's coefficients (from the same input)."""
        d = self.kernel_projection(x).reshape(*x.shape[:-1], 2, self.kernel_size, -1)
        return grouped_conv(x, d[..., 0, :, :], self.base_kernel[0], self.group_size), d[
            ..., 1, :, :
        ]

    def finish(self, y: mx.array, delta: mx.array) -> mx.array:
        return grouped_conv(y, delta, self.base_kernel[1], self.group_size)


class ConvDecoderLayer(InjectedDecoderLayer):
    """The DFlash draft layer with a dynamic convolution around attention and around the MLP."""

    def __init__(self, s: AttentionShape, intermediate_size: int, kernel: int, group: int):
        super().__init__(s, intermediate_size)
        self.attention_conv = GroupedDynamicConv(s.hidden_size, kernel, group)
        self.mlp_conv = GroupedDynamicConv(s.hidden_size, kernel, group)

    def __call__(self, x: mx.array, context, cache: KVCache, mask=None) -> mx.array:
        h, delta = self.attention_conv.prepare(self.input_layernorm(x))
        x = x + self.attention_conv.finish(self.self_attn(h, context, cache, mask), delta)
        h, delta = self.mlp_conv.prepare(self.post_attention_layernorm(x))
        return x + self.mlp_conv.finish(self.mlp(h), delta)


class CandidateSelector(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, rank: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        # Raw arrays, named as the checkpoints store them (never quantized, as in the reference).
        self.predecessor_codebook = mx.zeros((vocab_size, rank))
        self.successor_codebook = mx.zeros((vocab_size, rank))
        self.hidden_projection = nn.Linear(hidden_size, rank, bias=False)

    def walk(
        self, h: mx.array, logits: mx.array, anchor: mx.array, params: SamplingParams
    ) -> Proposal:
        """h [n, H], logits [n, V] (float32) -> the chain's tokens and (sampling) q [n, V]."""
        k = min(self.top_k, logits.shape[-1])
        candidates = mx.argpartition(-logits, k - 1, axis=-1)[:, :k]
        unary = mx.take_along_axis(logits, candidates, axis=-1)
        projected = self.hidden_projection(h).astype(mx.float32)
        pred_book = self.predecessor_codebook.astype(mx.float32)
        succ_book = self.successor_codebook.astype(mx.float32)
        prev, tokens, qs = anchor, [], []
        for t in range(h.shape[0]):
            context = pred_book[prev] * projected[t]  # [1, r]
            scores = unary[t] + (succ_book[candidates[t]] @ context[0])  # [k]
            if params.greedy:
                pick = mx.argmax(scores)
            else:
                q = mx.softmax(scores / params.temperature)
                pick = draw(q[None])[0]
                dense = mx.zeros((logits.shape[-1],), mx.float32)
                qs.append(dense.at[candidates[t]].add(q)[None])
            prev = candidates[t][pick][None].astype(mx.int32)
            tokens.append(prev)
        if not tokens:
            return Proposal(mx.zeros((0,), mx.int32), None)
        return Proposal(mx.concatenate(tokens), mx.concatenate(qs) if qs else None)


class DFlash2Drafter(DFlashDrafter):
    def __init__(self, config: DFlash2Config):
        super().__init__(config)
        self.candidate_selector = CandidateSelector(
            config.vocab_size, config.shape.hidden_size, config.selector_rank, config.selector_top_k
        )

    def make_layer(self, s: AttentionShape, intermediate_size: int) -> nn.Module:
        cfg = self.config
        return ConvDecoderLayer(s, intermediate_size, cfg.conv_kernel_size, cfg.conv_group_size)

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
        h = self.hidden(block, context, state, n)
        logits = self.head(h).astype(mx.float32)
        return self.candidate_selector.walk(h, logits, block[:1], params)


def accepts_mode(config: dict, mode: str) -> bool:
    return mode == MODE


def build(config: dict, what: str) -> DFlash2Drafter:
    return DFlash2Drafter(DFlash2Config.from_dict(config, what))
