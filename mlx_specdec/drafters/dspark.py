"""DSpark (DeepSpec `Qwen3DSparkModel` / `Gemma4DSparkModel`): a parallel KV-injection backbone, a
sequential low-rank Markov head and a confidence head. DeepSpec's DFlash checkpoints are the same
classes with `markov_rank = 0` and no confidence head. The DeepSpec repository's
`Qwen3DSparkModel` is the reference; tests/fixtures/conformance holds its outputs."""

from __future__ import annotations

from dataclasses import dataclass, replace

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache

from ..cache import kv_cache
from ..errors import SpecDecError
from ..sampling import SamplingParams
from .base import Proposal
from .layers import (
    BACKBONE_KEYS,
    AttentionShape,
    InjectedDecoderLayer,
    TargetCopies,
    anchor_block,
    attention_shape,
    check_gemma4_drafter,
    gemma4_attention_shape,
    gemma_embed_scale,
    pick,
    require_keys,
    rope_scaling,
)

ARCHITECTURES = ("Qwen3DSparkModel", "Gemma4DSparkModel")
MODE = "dspark"


@dataclass(frozen=True)
class DSparkConfig:
    shape: AttentionShape
    intermediate_size: int
    num_layers: int
    vocab_size: int
    block_size: int
    mask_token_id: int
    target_layer_ids: tuple[int, ...]
    num_target_layers: int | None
    markov_rank: int
    confidence_head: bool
    confidence_with_markov: bool
    architecture: str
    gemma: bool = False  # Gemma-4 layers, scaled embeddings, soft-capped logits
    logit_softcap: float | None = None
    # Other formats (defaults are DeepSpec's): the first block row that drafts (0: the anchor's
    # row predicts the next token; 1: rows 1.. predict their own position, as z-lab DFlash), a
    # reduced draft vocabulary, and embedding / LM head borrowed from the target.
    logits_start: int = 0
    draft_vocab_size: int | None = None
    shared_embedding: bool = False
    shared_lm_head: bool = False

    @property
    def kind(self) -> str:
        """DeepSpec's DFlash checkpoints are this layout without a Markov head."""
        return "dspark" if self.markov_rank else "dflash"

    @classmethod
    def from_dict(cls, c: dict, where: str = "config.json") -> DSparkConfig:
        keys = BACKBONE_KEYS + ("block_size", "mask_token_id", "target_layer_ids")
        require_keys(c, keys, "DSpark", where)
        head_type = c.get("markov_head_type", "vanilla")
        if int(c.get("markov_rank", 0)) and head_type != "vanilla":
            raise SpecDecError(
                f"{where}: markov_head_type '{head_type}' is not supported (only 'vanilla', "
                "the type of every released DSpark checkpoint)"
            )
        if c.get("log_snr_conditioning"):
            raise SpecDecError(
                f"{where}: log_snr_conditioning = true (GIDD diffusion conditioning) is not "
                "supported"
            )
        start = int(c.get("logits_start", 0))
        if start not in (0, 1):
            raise SpecDecError(f"{where}: logits_start must be 0 or 1, got {start}")
        architecture = (c.get("architectures") or ["?"])[0]
        gemma = architecture == "Gemma4DSparkModel"
        if gemma:
            check_gemma4_drafter(c, where)
        shape = gemma4_attention_shape(c) if gemma else attention_shape(c)
        scaling = None if gemma else rope_scaling(c, where)
        if scaling:
            shape = replace(
                shape,
                rope_scaling=scaling,
                max_position_embeddings=c.get("max_position_embeddings"),
            )
        draft_vocab = c.get("draft_vocab_size")
        return cls(
            shape=shape,
            intermediate_size=int(c["intermediate_size"]),
            num_layers=int(c["num_hidden_layers"]),
            vocab_size=int(c["vocab_size"]),
            block_size=int(c["block_size"]),
            mask_token_id=int(c["mask_token_id"]),
            target_layer_ids=tuple(int(i) for i in c["target_layer_ids"]),
            num_target_layers=c.get("num_target_layers"),
            markov_rank=int(c.get("markov_rank", 0)),
            confidence_head=bool(c.get("enable_confidence_head", False)),
            confidence_with_markov=bool(c.get("confidence_head_with_markov", False)),
            architecture=architecture,
            gemma=gemma,
            logit_softcap=c.get("final_logit_softcapping") if gemma else None,
            logits_start=start,
            draft_vocab_size=int(draft_vocab) if draft_vocab else None,
            shared_embedding=bool(c.get("shared_embedding", False)),
            shared_lm_head=bool(c.get("shared_lm_head", False)),
        )

    @property
    def head_rows(self) -> int:
        return self.draft_vocab_size or self.vocab_size


class MarkovHead(nn.Module):
    """First-order token transition bias: bias(prev) = W2 · W1[prev]."""

    def __init__(self, vocab_size: int, rank: int, draft_vocab_size: int):
        super().__init__()
        self.markov_w1 = nn.Embedding(vocab_size, rank)  # indexed by the previous target id
        self.markov_w2 = nn.Linear(rank, draft_vocab_size, bias=False)


class ConfidenceHead(nn.Module):
    def __init__(self, dims: int):
        super().__init__()
        self.proj = nn.Linear(dims, 1, bias=True)


class DSparkDrafter(TargetCopies, nn.Module):
    """`confidence_threshold` > 0 cuts each round's drafts at the first slot whose confidence
    head scores below it (needs a confidence head; without one it has no effect)."""

    def __init__(self, config: DSparkConfig, confidence_threshold: float = 0.0):
        super().__init__()
        if not 0 <= confidence_threshold < 1:
            raise SpecDecError(
                f"confidence threshold must be in [0, 1), got {confidence_threshold}"
            )
        s = config.shape
        self.config = config
        self.kind = config.kind
        self.confidence_threshold = confidence_threshold
        self.tap_ids = config.target_layer_ids
        self.max_draft = config.block_size - config.logits_start
        if not config.shared_embedding:
            self.embed_tokens = nn.Embedding(config.vocab_size, s.hidden_size)
        self.fc = nn.Linear(len(config.target_layer_ids) * s.hidden_size, s.hidden_size, bias=False)
        self.hidden_norm = nn.RMSNorm(s.hidden_size, eps=s.rms_norm_eps)
        self.layers = [
            InjectedDecoderLayer(s, config.intermediate_size, gemma=config.gemma)
            for _ in range(config.num_layers)
        ]
        self.norm = nn.RMSNorm(s.hidden_size, eps=s.rms_norm_eps)
        if not config.shared_lm_head:
            self.lm_head = nn.Linear(s.hidden_size, config.head_rows, bias=False)
        if config.markov_rank:
            self.markov_head = MarkovHead(config.vocab_size, config.markov_rank, config.head_rows)
        if config.confidence_head:
            extra = config.markov_rank if config.confidence_with_markov else 0
            self.confidence_head = ConfidenceHead(s.hidden_size + extra)
        object.__setattr__(self, "_shared", {})  # see TargetCopies
        if config.gemma:
            self._embed_scale = gemma_embed_scale(s.hidden_size)
            self._logit_softcap = config.logit_softcap

    def new_state(self, padded: bool = False) -> list[KVCache]:
        return [kv_cache(padded) for _ in self.layers]

    def backbone(
        self, block: mx.array, context: mx.array | None, caches: list[KVCache]
    ) -> mx.array:
        """Block ids [B] (anchor then masks) + new context taps -> normed hidden states [B, H]."""
        x = self._embed(block)[None]
        c = self.hidden_norm(self.fc(context))[None] if context is not None else None
        for layer, cache in zip(self.layers, caches):
            x = layer(x, c, cache)
        return self.norm(x)[0]

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
        start = cfg.logits_start
        h = self.backbone(block, context, state)[start : start + n]
        logits = self._head(h)
        if not cfg.markov_rank:  # DFlash-style: slots are independent
            return Proposal(*pick(self._to_target(logits), params))
        # Markov: slot k's bias depends on the token drawn at slot k-1 (the anchor for k = 0).
        w1, w2 = self.markov_head.markov_w1, self.markov_head.markov_w2
        prev = block[:1]
        tokens, qs, prevs = [], [], []
        for k in range(n):
            prevs.append(prev)
            prev, q = pick(self._to_target(logits[k : k + 1] + w2(w1(prev))), params)
            tokens.append(prev)
            if q is not None:
                qs.append(q)
        proposal = Proposal(
            mx.concatenate(tokens) if tokens else mx.zeros((0,), mx.int32),
            mx.concatenate(qs) if qs else None,
        )
        if self.confidence_threshold > 0 and cfg.confidence_head and n:
            feats = h
            if cfg.confidence_with_markov:
                feats = mx.concatenate([h, w1(mx.concatenate(prevs)).astype(h.dtype)], axis=-1)
            confidence = mx.sigmoid(self.confidence_head.proj(feats)[:, 0].astype(mx.float32))
            # The cut needs the scores on the host: one extra sync, only when asked for.
            scores = confidence.tolist()
            keep = next((k for k, c in enumerate(scores) if c < self.confidence_threshold), n)
            q = proposal.q[:keep] if proposal.q is not None else None
            proposal = Proposal(proposal.tokens[:keep], q)
        return proposal


def accepts_mode(config: dict, mode: str) -> bool:
    """DeepSpec's DFlash checkpoints are this class without a Markov head."""
    return mode == "dflash" and not int(config.get("markov_rank", 0))


def build(config: dict, what: str, confidence_threshold: float = 0.0) -> DSparkDrafter:
    return DSparkDrafter(DSparkConfig.from_dict(config, what), confidence_threshold)
